//! The example policies in examples/policies/ compile and pass their own tests.

use std::path::PathBuf;

use altroute_policy::compile;

#[test]
fn example_policies_compile_and_pass_their_tests() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let compiled = compile(&src).unwrap_or_else(|d| {
            panic!(
                "{}: {}",
                path.display(),
                d.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(
            !compiled.policy.tests.is_empty(),
            "{} has no tests",
            path.display()
        );
        seen += 1;
    }
    assert!(
        seen >= 3,
        "expected at least 3 example policies in {}",
        dir.display()
    );
}
