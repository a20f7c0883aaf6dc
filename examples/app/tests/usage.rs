//! Bad usage is refused with the usage text and exit code 2, before any
//! connection is attempted. (Also makes `cargo test --workspace` build the
//! app's binary, which pgtwig's tests/examples.rs drives through the proxy.)

#[test]
fn unknown_command_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgtwig-example-app"))
        .arg("frobnicate")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown command") && err.contains("migrate"),
        "{err}"
    );
}
