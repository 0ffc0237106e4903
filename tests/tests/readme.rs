//! The README's promises, checked the way a new user would: `scripts/run` starts Keyshare, and
//! every shell block of the walkthrough runs against it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use keyshare_runtime::testkit::{TestDatabase, tool, workspace_root};

/// The ```sh blocks of one README section, each with whether it is marked to fail.
fn shell_blocks(readme: &str, section: &str) -> Vec<(String, bool)> {
    let start = readme.find(section).unwrap_or_else(|| panic!("README has no section {section:?}"));
    let body = &readme[start + section.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut blocks = Vec::new();
    let mut lines = body.lines().peekable();
    let mut expect_failure = false;
    while let Some(line) = lines.next() {
        if line.trim() == "<!-- expect-failure -->" {
            expect_failure = true;
        } else if line.trim() == "```sh" {
            let mut block = String::new();
            for inner in lines.by_ref() {
                if inner.trim() == "```" {
                    break;
                }
                block.push_str(inner);
                block.push('\n');
            }
            blocks.push((block, expect_failure));
            expect_failure = false;
        }
    }
    blocks
}

/// Kills the whole process group of `scripts/run` if the test fails before stopping it.
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &format!("-{}", self.0)]).status();
    }
}

#[tokio::test]
async fn scripts_run_and_the_walkthrough_work() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = shell_blocks(&readme, "## Walkthrough with grpcurl");
    assert!(blocks.len() >= 5, "the walkthrough lost its commands");

    let db = TestDatabase::create().await;
    let work = tempfile::tempdir().unwrap();
    let mut run = Command::new(root.join("scripts/run"))
        .current_dir(work.path())
        .env("DATABASE_URL", &db.url)
        .env("KEYSHARE_PROFILE", "debug")
        .env("KEYSHARE_MAIL_SPOOL_DIR", "var/mail")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let guard = KillGroup(run.id());
    let stdout = run.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Keyshare is running") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(300)).expect("scripts/run did not report that Keyshare is running");

    // One shell session, so variables set by one block are there for the next.
    let mut script = String::from("set -euo pipefail\n");
    for (index, (block, expect_failure)) in blocks.iter().enumerate() {
        if *expect_failure {
            script.push_str(&format!(
                "if ( {block} ) >/dev/null 2>&1; then echo 'block {index} should fail'; exit 1; fi\n"
            ));
        } else {
            script.push_str(&format!("echo '--- block {index}'\n{block}\n"));
        }
    }
    let path = format!("{}:{}", tool("grpcurl").parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let walkthrough =
        Command::new("bash").arg("-c").arg(&script).current_dir(work.path()).env("PATH", path).output().unwrap();

    // Stop it as an operator would. (Ctrl-C's SIGINT cannot be used here: a test harness starts
    // children with SIGINT ignored, and a non-interactive bash cannot trap a signal ignored at
    // entry. scripts/run handles SIGTERM the same way.)
    Command::new("kill").args(["-TERM", &run.id().to_string()]).status().unwrap();
    let status = run.wait().unwrap();
    std::mem::forget(guard);

    let stdout = String::from_utf8_lossy(&walkthrough.stdout);
    let stderr = String::from_utf8_lossy(&walkthrough.stderr);
    assert!(walkthrough.status.success(), "walkthrough failed:\n{stdout}\n{stderr}");
    for expected in [
        "ORGANIZATION_ROLE_OWNER",
        r#""sandboxCredential": "ks_test_"#,
        r#""productionCredential": "ks_live_"#,
        r#""credential": "ks_live_"#,
        r#""previousCredential""#,
        r#""callerRole": "KEY_ROLE_CONTRIBUTOR""#,
        r#""accepted": 1"#,
        r#""outcome": "OUTCOME_VALID""#,
        r#""outcome": "OUTCOME_DISABLED""#,
    ] {
        assert!(stdout.contains(expected), "{expected} missing from the walkthrough output:\n{stdout}");
    }
    assert!(status.success(), "scripts/run exited with {status:?}");
}
