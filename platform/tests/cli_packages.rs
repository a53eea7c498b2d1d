//! keygen → pack → inspect → run through the real binary, and every refusal on the way.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tern(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-pkg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Creates a key and a package of a small agent; returns the author's public key.
fn key_and_package(dir: &Path) -> String {
    let out = tern(dir, &["keygen", "--out", "author.pem", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(v["peer_id"].as_str().unwrap().starts_with("12D3KooW"));
    std::fs::write(
        dir.join("agent.rhai"),
        "let n = 0; for x in nodes() { migrate(x); n += 1; } [n, here()]",
    )
    .unwrap();
    let out = tern(
        dir,
        &[
            "pack",
            "agent.rhai",
            "--key",
            "author.pem",
            "--name",
            "tour",
            "--version",
            "1.2.3",
            "--resource",
            "data=rebind",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    v["public_key"].as_str().unwrap().to_string()
}

#[test]
fn keygen_pack_inspect_run() {
    let dir = workdir("happy");
    let author = key_and_package(&dir);
    let out = tern(&dir, &["inspect", "agent.tern", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(m["name"], "tour");
    assert_eq!(m["version"], "1.2.3");
    assert_eq!(m["author"], author.as_str());
    assert_eq!(m["signature"], "valid");
    assert_eq!(m["resources"][0]["policy"], "rebind");
    let out = tern(&dir, &["run", "agent.tern", "--trust-author", &author]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().last().unwrap(), r#"[3,"node-2"]"#);
}

#[test]
fn keygen_refuses_to_overwrite_and_writes_mode_0600() {
    let dir = workdir("keygen");
    assert!(tern(&dir, &["keygen", "--out", "k.pem"]).status.success());
    let out = tern(&dir, &["keygen", "--out", "k.pem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(tern(&dir, &["keygen", "--out", "k.pem", "--force"])
        .status
        .success());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("k.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn openssl_reads_the_key() {
    let dir = workdir("openssl");
    let out = tern(&dir, &["keygen", "--out", "k.pem", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let Ok(ssl) = Command::new("openssl")
        .current_dir(&dir)
        .args(["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"])
        .output()
    else {
        eprintln!("openssl not installed: skipped");
        return;
    };
    assert!(
        ssl.status.success(),
        "{}",
        String::from_utf8_lossy(&ssl.stderr)
    );
    // SubjectPublicKeyInfo DER of an ed25519 key: 12-byte prefix then the 32 key bytes.
    let hex: String = ssl.stdout[12..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(format!("ed25519:{hex}"), v["public_key"].as_str().unwrap());
}

#[test]
fn an_untrusted_author_is_refused() {
    let dir = workdir("untrusted");
    key_and_package(&dir);
    let out = tern(&dir, &["run", "agent.tern"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("refused") && stderr(&out).contains("--trust-author"),
        "{}",
        stderr(&out)
    );
    let other = tern(&dir, &["keygen", "--out", "other.pem", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&other).trim()).unwrap();
    let out = tern(
        &dir,
        &[
            "run",
            "agent.tern",
            "--trust-author",
            v["public_key"].as_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(tern(&dir, &["run", "agent.tern", "--trust-any-author"])
        .status
        .success());
}

#[test]
fn one_flipped_byte_anywhere_is_refused() {
    let dir = workdir("flip");
    let author = key_and_package(&dir);
    let original = std::fs::read(dir.join("agent.tern")).unwrap();
    // Every byte, one at a time (the package is small).
    for i in 0..original.len() {
        let mut bytes = original.clone();
        bytes[i] ^= 0x01;
        std::fs::write(dir.join("bad.tern"), &bytes).unwrap();
        let out = tern(&dir, &["inspect", "bad.tern"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "byte {i} flipped was accepted by inspect"
        );
        if i % 16 == 0 {
            let out = tern(&dir, &["run", "bad.tern", "--trust-author", &author]);
            assert_eq!(
                out.status.code(),
                Some(1),
                "byte {i} flipped was accepted by run"
            );
        }
    }
}

#[test]
fn truncated_and_garbage_packages_are_refused() {
    let dir = workdir("garbage");
    key_and_package(&dir);
    let original = std::fs::read(dir.join("agent.tern")).unwrap();
    for cut in [0, 1, 8, original.len() / 2, original.len() - 1] {
        std::fs::write(dir.join("cut.tern"), &original[..cut]).unwrap();
        let out = tern(&dir, &["inspect", "cut.tern"]);
        assert_eq!(out.status.code(), Some(1), "truncated at {cut}");
        assert!(stderr(&out).contains("cut.tern"), "{}", stderr(&out));
    }
    std::fs::write(dir.join("junk.tern"), b"not a package at all").unwrap();
    assert_eq!(tern(&dir, &["inspect", "junk.tern"]).status.code(), Some(1));
}

#[test]
fn pack_refuses_a_script_that_does_not_compile() {
    let dir = workdir("badscript");
    assert!(tern(&dir, &["keygen", "--out", "k.pem"]).status.success());
    std::fs::write(dir.join("bad.rhai"), "let x = 1 + migrate(\"a\");").unwrap();
    let out = tern(&dir, &["pack", "bad.rhai", "--key", "k.pem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 1, column"), "{}", stderr(&out));
    std::fs::write(dir.join("syntax.rhai"), "let = ;").unwrap();
    let out = tern(&dir, &["pack", "syntax.rhai", "--key", "k.pem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("syntax error at line 1"),
        "{}",
        stderr(&out)
    );
    std::fs::write(dir.join("ok.rhai"), "1").unwrap();
    let out = tern(
        &dir,
        &[
            "pack",
            "ok.rhai",
            "--key",
            "k.pem",
            "--resource",
            "x=teleport",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
}

/// `--resource NAME=POLICY/BINDING` states the kind of binding; one its policy cannot keep
/// (the paper's table) is refused at pack with the reason, and `inspect` shows the kind.
#[test]
fn pack_takes_the_kind_of_binding_and_refuses_what_the_policy_cannot_keep() {
    let dir = workdir("bindings");
    assert!(tern(&dir, &["keygen", "--out", "k.pem"]).status.success());
    std::fs::write(dir.join("ok.rhai"), "1").unwrap();
    let pack = |binding: &str| {
        let args = ["pack", "ok.rhai", "--key", "k.pem", "--resource", binding];
        tern(&dir, &args)
    };
    for (binding, says) in [
        ("x=rebind/by-identifier", "binding by type"),
        ("x=copy/by-identifier", "needs that very resource"),
        ("x=move/by-name", "unknown binding kind 'by-name'"),
    ] {
        let out = pack(binding);
        assert_eq!(out.status.code(), Some(1), "{binding}");
        assert!(stderr(&out).contains(says), "{binding}: {}", stderr(&out));
    }
    let out = pack("x=copy/by-type");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tern(&dir, &["inspect", "ok.tern", "--json"]);
    let m: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(m["resources"][0]["policy"], "copy");
    assert_eq!(m["resources"][0]["binding"], "by-type");
}

/// The budgets a package asks for are signed in its manifest, shown by `inspect` and enforced
/// by `run`: an agent that asks to send at most 3 messages ends at its fourth.
#[test]
fn budgets_asked_for_at_pack_are_shown_and_enforced() {
    let dir = workdir("budgets");
    let out = tern(&dir, &["keygen", "--out", "k.pem", "--json"]);
    let key: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    std::fs::write(
        dir.join("chatty.rhai"),
        "for i in 0..4 { send(id(), i); receive(); }\n42",
    )
    .unwrap();
    let out = tern(
        &dir,
        &[
            "pack",
            "chatty.rhai",
            "--key",
            "k.pem",
            "--max-memory-bytes",
            "8388608",
            "--max-messages-sent",
            "3",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tern(&dir, &["inspect", "chatty.tern", "--json"]);
    let m: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(m["limits"]["max_memory_bytes"], 8388608);
    assert_eq!(m["limits"]["max_messages_sent"], 3);
    let author = key["public_key"].as_str().unwrap();
    let out = tern(&dir, &["run", "chatty.tern", "--trust-author", author]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("sent 4 messages, more than its budget of 3"),
        "{}",
        stderr(&out)
    );
}
