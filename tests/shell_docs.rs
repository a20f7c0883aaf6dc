//! `pgtwig completions SHELL` and `pgtwig man`: the bash script loads in a real bash and
//! completes subcommands and their subcommands; the man page renders with man(1).

mod common;

use std::process::Command;

fn pgtwig(args: &[&str]) -> String {
    let out = Command::new(common::BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "pgtwig {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What bash completes for the words `line` (the last one being completed), with the script
/// `pgtwig completions bash` sourced.
fn bash_completes(script: &std::path::Path, line: &[&str]) -> Vec<String> {
    let words = line
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let program = format!(
        "set -e\nsource '{}'\ncomplete -p pgtwig >/dev/null\nCOMP_WORDS=({words})\nCOMP_CWORD={}\n\
         COMP_LINE='{}'\nCOMP_POINT=${{#COMP_LINE}}\n_pgtwig pgtwig '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        line.len() - 1,
        line.join(" "),
        line[line.len() - 1],
        line[line.len() - 2],
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash could not load or run the completion: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completion_loads_and_completes_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("pgtwig.bash");
    std::fs::write(&script, pgtwig(&["completions", "bash"])).unwrap();

    let top = bash_completes(&script, &["pgtwig", "br"]);
    assert_eq!(top, ["branch"], "pgtwig br<TAB>");
    let doc = bash_completes(&script, &["pgtwig", "comp"]);
    assert_eq!(doc, ["completions"], "pgtwig comp<TAB>");
    let sub = bash_completes(&script, &["pgtwig", "branch", "cr"]);
    assert_eq!(sub, ["create"], "pgtwig branch cr<TAB>");
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    for shell in ["zsh", "fish"] {
        let script = pgtwig(&["completions", shell]);
        for word in ["branch", "completions"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
        // Where the shell is installed, it must accept the script.
        let check = match shell {
            "zsh" => ["zsh", "-n"],
            _ => ["fish", "--no-execute"],
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("script");
        std::fs::write(&file, &script).unwrap();
        match Command::new(check[0]).arg(check[1]).arg(&file).output() {
            Ok(out) => assert!(
                out.status.success(),
                "{shell} rejects its completion script: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => eprintln!("{shell} is not installed: checked the script's words only"),
        }
    }
    let out = Command::new(common::BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bash"),
        "an unknown shell should list the known ones"
    );
}

#[test]
fn man_pages_render_with_man() {
    let page = pgtwig(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH pgtwig 1"),
        "{page}"
    );
    let dir = tempfile::tempdir().unwrap();
    let said = pgtwig(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(said.starts_with("Wrote "), "{said}");
    for name in ["pgtwig.1", "pgtwig-branch-create.1"] {
        assert!(dir.path().join(name).is_file(), "{name} not written");
    }
    assert!(
        !dir.path().join("pgtwig-hook.1").exists(),
        "the hidden hook command got a page"
    );
    let rendered = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("pgtwig-branch-create.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output();
    match rendered {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("pgtwig branch create"), "{text}");
            assert!(text.contains("--from"), "{text}");
        }
        Ok(out) => panic!("man -l failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must render the man page: {e}"
            );
            eprintln!("SKIPPED rendering: no man(1) ({e})");
        }
    }
}
