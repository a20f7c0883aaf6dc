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
        for word in ["branch", "doctor", "completions"] {
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

/// Every file under `dir`, relative to it, with its bytes.
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                files.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

/// The wheel installs packaging/wheel-data's man pages and completions: they must be what
/// this pgtwig prints (packaging/generate-docs writes them).
#[test]
fn the_wheels_man_pages_and_completions_are_current() {
    let fresh = tempfile::tempdir().unwrap();
    let share = fresh.path();
    pgtwig(&["man", "--dir", share.join("man/man1").to_str().unwrap()]);
    for (shell, path) in [
        ("bash", "bash-completion/completions/pgtwig"),
        ("zsh", "zsh/site-functions/_pgtwig"),
        ("fish", "fish/vendor_completions.d/pgtwig.fish"),
    ] {
        let file = share.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, pgtwig(&["completions", shell])).unwrap();
    }
    let committed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/wheel-data/data/share");
    let (want, have) = (tree(share), tree(&committed));
    let stale: std::collections::BTreeSet<&String> = want
        .keys()
        .chain(have.keys())
        .filter(|k| want.get(*k) != have.get(*k))
        .collect();
    assert!(
        stale.is_empty(),
        "packaging/wheel-data is behind the commands ({stale:?} differ): run packaging/generate-docs and commit \
         what it writes"
    );
}
