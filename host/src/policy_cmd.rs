//! `altroute policy compile | check | test | explain`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use altroute_policy::{
    CertStatus, Hop, MtaSts, Phase, Policy, Query, Starttls, TlsVersion, Token, compile,
    compile_without_tests, contract, explain,
};

/// Work with policy files.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Compile a TOML policy into the canonical JSON the module loads.
    Compile {
        /// The policy (TOML).
        file: PathBuf,
        /// Write the JSON here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Check a policy (TOML, or compiled JSON) and list every problem with its location.
    Check { file: PathBuf },
    /// Run the policy's embedded tests (TOML, or compiled JSON), one line per test.
    Test { file: PathBuf },
    /// Explain the decision for one query: the decision and the chain of rules behind it.
    Explain(ExplainArgs),
    /// Activate a policy on the running relay (admin endpoint; see docs/reload.md).
    Apply {
        /// The policy (TOML or compiled JSON).
        file: PathBuf,
        #[command(flatten)]
        admin: crate::reload::AdminArgs,
    },
    /// Return the running relay to its previous policy version.
    Rollback {
        #[command(flatten)]
        admin: crate::reload::AdminArgs,
    },
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The policy (TOML, or compiled JSON).
    pub file: PathBuf,
    /// The whole query as JSON (fields as in the policy's [[tests]] query); flags below
    /// override its fields.
    #[arg(long)]
    pub query: Option<String>,
    #[arg(long, value_parser = token::<Phase>)]
    pub phase: Option<Phase>,
    #[arg(long)]
    pub sender: Option<String>,
    #[arg(long)]
    pub recipient: Option<String>,
    #[arg(long)]
    pub requiretls: bool,
    #[arg(long)]
    pub tls_required_no: bool,
    #[arg(long, value_parser = token::<Hop>)]
    pub hop: Option<Hop>,
    #[arg(long)]
    pub mx: Option<String>,
    #[arg(long, value_parser = token::<Starttls>)]
    pub starttls: Option<Starttls>,
    #[arg(long, value_parser = token::<TlsVersion>)]
    pub tls: Option<TlsVersion>,
    #[arg(long, value_parser = token::<CertStatus>)]
    pub cert: Option<CertStatus>,
    #[arg(long, value_parser = token::<MtaSts>)]
    pub mta_sts: Option<MtaSts>,
}

fn token<T: Token>(s: &str) -> Result<T, String> {
    T::parse_token(s).ok_or_else(|| {
        let all: Vec<&str> = T::ALL.iter().map(|t| t.token()).collect();
        format!("expected one of: {}", all.join(", "))
    })
}

/// Run a policy subcommand; returns the process exit code.
pub fn run(cmd: PolicyCommand) -> Result<i32> {
    match cmd {
        PolicyCommand::Apply { file, admin } => crate::reload::apply_command(&file, &admin),
        PolicyCommand::Rollback { admin } => crate::reload::rollback_command(&admin),
        PolicyCommand::Compile { file, output } => {
            let src = read(&file)?;
            match compile(&src) {
                Ok(c) => {
                    match output {
                        Some(out) => {
                            std::fs::write(&out, c.json.as_bytes())
                                .with_context(|| format!("writing {}", out.display()))?;
                            eprintln!(
                                "{}: policy {:?} compiled, version {} -> {}",
                                file.display(),
                                c.policy.name,
                                c.policy.version,
                                out.display()
                            );
                        }
                        None => crate::outln!("{}", c.json)?,
                    }
                    Ok(0)
                }
                Err(diags) => Ok(report(&file, &diags)),
            }
        }
        PolicyCommand::Check { file } => {
            let src = read(&file)?;
            let policy = if is_json(&src) {
                match Policy::from_json(src.as_bytes()) {
                    Ok(p) => p,
                    Err(e) => return Ok(report_json(&file, e)),
                }
            } else {
                match compile(&src) {
                    Ok(c) => c.policy,
                    Err(diags) => return Ok(report(&file, &diags)),
                }
            };
            crate::outln!(
                "{}: ok, policy {:?} version {} ({} hosts, {} rules, {} routes, {} tests)",
                file.display(),
                policy.name,
                policy.version,
                policy.hosts.len(),
                policy.compliance.len(),
                policy.routes.len(),
                policy.tests.len()
            )?;
            Ok(0)
        }
        PolicyCommand::Test { file } => {
            let src = read(&file)?;
            let policy = if is_json(&src) {
                match Policy::from_json_without_tests(src.as_bytes()) {
                    Ok(p) => p,
                    Err(e) => return Ok(report_json(&file, e)),
                }
            } else {
                match compile_without_tests(&src) {
                    Ok(c) => c.policy,
                    Err(diags) => return Ok(report(&file, &diags)),
                }
            };
            let outcomes = policy.run_tests();
            let mut failed = 0;
            for o in &outcomes {
                if o.passed() {
                    crate::outln!("pass  {}", o.name)?;
                } else {
                    failed += 1;
                    crate::outln!("FAIL  {}: {}", o.name, o.mismatches.join("; "))?;
                }
            }
            crate::outln!(
                "{} tests, {} passed, {} failed (policy version {})",
                outcomes.len(),
                outcomes.len() - failed,
                failed,
                policy.version
            )?;
            Ok(if failed == 0 { 0 } else { 1 })
        }
        PolicyCommand::Explain(args) => explain_cmd(args),
    }
}

fn explain_cmd(args: ExplainArgs) -> Result<i32> {
    let policy = load_policy(&args.file)?;
    let mut q: Query = match &args.query {
        Some(json) => serde_json::from_str(json).context("--query is not a valid query")?,
        None => Query::default(),
    };
    if let Some(v) = args.phase {
        q.phase = v;
    }
    if let Some(v) = args.sender {
        q.sender = v;
    }
    if let Some(v) = args.recipient {
        q.recipient = v;
    }
    q.requiretls |= args.requiretls;
    q.tls_required_no |= args.tls_required_no;
    if let Some(v) = args.hop {
        q.hop = v;
    }
    if let Some(v) = args.mx {
        q.mx = v;
    }
    if let Some(v) = args.starttls {
        q.starttls = v;
    }
    if let Some(v) = args.tls {
        q.tls = v;
    }
    if let Some(v) = args.cert {
        q.cert = v;
    }
    if let Some(v) = args.mta_sts {
        q.mta_sts = v;
    }
    if !q.recipient.contains('@') {
        bail!("a query needs a recipient address (--recipient user@domain)");
    }
    // What the module refuses (the header contract's `is_mailbox`) is not explained as a
    // decision it would make: it answers a fault (defer) there.
    for (what, address) in [("recipient", &q.recipient), ("sender", &q.sender)] {
        let null_sender = what == "sender" && address.is_empty();
        if !null_sender && !altroute_policy::pattern::is_mailbox(address) {
            bail!(
                "the {what} {address:?} is not a mailbox the relay or the module takes \
                 (the module answers such a question with a fault: defer)"
            );
        }
    }
    let (d, trace) = explain(&policy, &q);
    crate::outln!("policy   {} ({})", policy.name, policy.version)?;
    crate::outln!(
        "query    {} {} -> {}{}",
        q.phase,
        if q.sender.is_empty() { "<>" } else { &q.sender },
        q.recipient,
        if q.phase == Phase::Verdict {
            format!(
                " at {} hop {:?}: STARTTLS {}, TLS {}, certificate {}",
                q.hop, q.mx, q.starttls, q.tls, q.cert
            )
        } else {
            String::new()
        }
    )?;
    crate::outln!("because")?;
    for (i, step) in trace.iter().enumerate() {
        crate::outln!("  {}. {step}", i + 1)?;
    }
    crate::outln!("decision")?;
    for (name, value) in contract::encode_decision(&d) {
        let shown = contract::decode_text(value.as_bytes()).unwrap_or(value);
        crate::outln!("  {name}: {shown}")?;
    }
    Ok(0)
}

/// Whether a policy file's text is compiled JSON (it starts with `{`) rather than TOML:
/// the rule of every command that reads a policy, of the relay and of its reloader.
fn is_json(src: &str) -> bool {
    src.trim_start().starts_with('{')
}

/// Load a policy from TOML (compiled here) or from compiled JSON.
pub fn load_policy(file: &Path) -> Result<Policy> {
    let src = read(file)?;
    if is_json(&src) {
        return Policy::from_json(src.as_bytes())
            .with_context(|| format!("{} is not a valid compiled policy", file.display()));
    }
    match compile(&src) {
        Ok(c) => Ok(c.policy),
        Err(diags) => {
            report(file, &diags);
            bail!("{} does not compile", file.display())
        }
    }
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// Like [`report`], for compiled JSON.
fn report_json(file: &Path, e: altroute_policy::Error) -> i32 {
    let problems = match e {
        altroute_policy::Error::Invalid(list) => list,
        other => vec![other.to_string()],
    };
    for p in &problems {
        eprintln!("{}: {p}", file.display());
    }
    eprintln!(
        "{}: {} problem{} found",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    1
}

fn report(file: &Path, diags: &[altroute_policy::Diagnostic]) -> i32 {
    for d in diags {
        eprintln!("{}: {}: {}", file.display(), d.location, d.message);
    }
    eprintln!(
        "{}: {} problem{} found",
        file.display(),
        diags.len(),
        if diags.len() == 1 { "" } else { "s" }
    );
    1
}
