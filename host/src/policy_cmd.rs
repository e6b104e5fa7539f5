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
    /// Check a policy and list every problem with its location.
    Check { file: PathBuf },
    /// Run the policy's embedded tests, one line per test.
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
                        None => println!("{}", c.json),
                    }
                    Ok(0)
                }
                Err(diags) => Ok(report(&file, &diags)),
            }
        }
        PolicyCommand::Check { file } => {
            let src = read(&file)?;
            match compile(&src) {
                Ok(c) => {
                    println!(
                        "{}: ok, policy {:?} version {} ({} hosts, {} rules, {} routes, {} tests)",
                        file.display(),
                        c.policy.name,
                        c.policy.version,
                        c.policy.hosts.len(),
                        c.policy.compliance.len(),
                        c.policy.routes.len(),
                        c.policy.tests.len()
                    );
                    Ok(0)
                }
                Err(diags) => Ok(report(&file, &diags)),
            }
        }
        PolicyCommand::Test { file } => {
            let src = read(&file)?;
            let compiled = match compile_without_tests(&src) {
                Ok(c) => c,
                Err(diags) => return Ok(report(&file, &diags)),
            };
            let outcomes = compiled.policy.run_tests();
            let mut failed = 0;
            for o in &outcomes {
                if o.passed() {
                    println!("pass  {}", o.name);
                } else {
                    failed += 1;
                    println!("FAIL  {}: {}", o.name, o.mismatches.join("; "));
                }
            }
            println!(
                "{} tests, {} passed, {} failed (policy version {})",
                outcomes.len(),
                outcomes.len() - failed,
                failed,
                compiled.policy.version
            );
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
    let (d, trace) = explain(&policy, &q);
    println!("policy   {} ({})", policy.name, policy.version);
    println!(
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
    );
    println!("because");
    for (i, step) in trace.iter().enumerate() {
        println!("  {}. {step}", i + 1);
    }
    println!("decision");
    for (name, value) in contract::encode_decision(&d) {
        let shown = contract::decode_text(value.as_bytes()).unwrap_or(value);
        println!("  {name}: {shown}");
    }
    Ok(0)
}

/// Load a policy from TOML (compiled here) or from compiled JSON.
pub fn load_policy(file: &Path) -> Result<Policy> {
    let src = read(file)?;
    if src.trim_start().starts_with('{') {
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
