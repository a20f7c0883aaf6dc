//! Configuration a repository cannot use against its users: `[neon]
//! api_url` that would send the Neon API key in clear text.

mod common;

use common::{Fs, TestEnv};

/// The Neon API key goes with every API request: `[neon] api_url` must be
/// https, or http to this machine only.
#[test]
fn neon_api_url_must_not_send_the_key_in_clear() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let write = |url: &str| {
        std::fs::write(
            env.repo.join(".pgtwig.toml"),
            format!(
                "project = \"shop\"\nbackend = \"neon\"\n[neon]\nproject_id = \"p\"\napi_url = \"{url}\"\n"
            ),
        )
        .unwrap();
    };
    // `init` refuses such a URL before writing anything.
    let e = env.fails(&[
        "init",
        "--neon-project",
        "p",
        "--neon-api-url",
        "http://10.1.2.3/api/v2",
    ]);
    assert!(
        e.contains("--neon-api-url") && e.contains("unencrypted to 10.1.2.3"),
        "{e}"
    );
    assert!(!env.repo.join(".pgtwig.toml").exists());
    write("http://api.neon.example/api/v2");
    let e = env.fails(&["branch", "list"]);
    assert!(
        e.contains(".pgtwig.toml")
            && e.contains("line 5")
            && e.contains("api_url")
            && e.contains("unencrypted to api.neon.example")
            && e.contains("use https://"),
        "{e}"
    );
}
