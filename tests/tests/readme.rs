//! The README's promises, checked the way a new user would: `scripts/run` starts Keyshare, every
//! shell block of the walkthrough runs against it, and then every block of the operations
//! section that this machine can run: rendering the Kubernetes manifests, rotating the signing
//! key, the key-encryption-key queries, backup, restore into a new database and, with the
//! services stopped, restore of one schema in place. Blocks marked `<!-- needs: … -->` (a
//! Kubernetes cluster, a container engine) are only checked to be valid shell.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use keyshare_runtime::testkit::{TestDatabase, free_ports, tool, workspace_root};

/// How the README says a block is to be run.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mark {
    /// Runs and must succeed.
    Run,
    /// `<!-- expect-failure -->`: runs and must fail.
    ExpectFailure,
    /// `<!-- services stopped -->`: runs, after Keyshare has been stopped.
    ServicesStopped,
    /// `<!-- needs: … -->`: needs what this machine does not have.
    Needs(String),
}

/// The ```sh blocks of one README section (up to the next `## ` heading), with their marks.
fn shell_blocks(readme: &str, section: &str) -> Vec<(String, Mark)> {
    let start = readme.find(section).unwrap_or_else(|| panic!("README has no section {section:?}"));
    let body = &readme[start + section.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut blocks = Vec::new();
    let mut lines = body.lines();
    let mut mark = Mark::Run;
    while let Some(line) = lines.next() {
        let line = line.trim();
        if line == "<!-- expect-failure -->" {
            mark = Mark::ExpectFailure;
        } else if line == "<!-- services stopped -->" {
            mark = Mark::ServicesStopped;
        } else if let Some(what) = line.strip_prefix("<!-- needs: ").and_then(|rest| rest.strip_suffix(" -->")) {
            mark = Mark::Needs(what.to_owned());
        } else if line == "```sh" {
            let mut block = String::new();
            for inner in lines.by_ref() {
                if inner.trim() == "```" {
                    break;
                }
                block.push_str(inner);
                block.push('\n');
            }
            blocks.push((block, std::mem::replace(&mut mark, Mark::Run)));
        }
    }
    blocks
}

/// One bash script that runs `blocks` in order in one shell session, so variables set by one
/// block are there for the next. Each block's output starts with `--- {label} {index}`.
fn script(label: &str, blocks: &[(String, Mark)]) -> String {
    let mut script = String::new();
    for (index, (block, mark)) in blocks.iter().enumerate() {
        match mark {
            Mark::Run => script.push_str(&format!("echo '--- {label} {index}'\n{block}\n")),
            Mark::ExpectFailure => script.push_str(&format!(
                "if ( {block} ) >/dev/null 2>&1; then echo '{label} {index} should fail'; exit 1; fi\n"
            )),
            Mark::ServicesStopped => {
                script.push_str(&format!("echo '--- {label} {index} (services stopped)'\nstop_keyshare\n{block}\n"))
            }
            Mark::Needs(what) => {
                // Not run here, but it must at least parse.
                let quoted = block.replace('\'', r"'\''");
                script.push_str(&format!(
                    "echo '--- {label} {index} needs {what}: syntax only'\nbash -n -c '{quoted}'\n"
                ));
            }
        }
    }
    script
}

/// Kills the whole process group of `scripts/run` if the test fails before stopping it.
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &format!("-{}", self.0)]).status();
    }
}

/// Drops the database the operations section restores into, before and after the test (the
/// README names it; it lives on the shared test server).
struct RestoredDatabase(String);

impl RestoredDatabase {
    const NAME: &str = "keyshare_restored";

    fn drop_it(&self) {
        let _ =
            Command::new("dropdb").args(["--if-exists", "--force", "--maintenance-db", &self.0, Self::NAME]).status();
    }
}

impl Drop for RestoredDatabase {
    fn drop(&mut self) {
        self.drop_it();
    }
}

/// The ports `scripts/run` uses when not told otherwise: gRPC from 50051, metrics from 9051.
const DEFAULT_GRPC_BASE: u16 = 50051;
const DEFAULT_METRICS_BASE: u16 = 9051;
/// How many services `scripts/run` numbers from its port base.
const SERVICES: u16 = 4;

/// `text` with every documented default port of `scripts/run` moved to the ports it serves on
/// with `KEYSHARE_PORT_BASE=base`, so the README's blocks run unchanged against an instance
/// on free ports.
fn moved_ports(text: &str, base: u16) -> String {
    let mut text = text.to_owned();
    for i in 0..SERVICES {
        text = text.replace(&format!("127.0.0.1:{}", DEFAULT_GRPC_BASE + i), &format!("127.0.0.1:{}", base + i));
        text =
            text.replace(&format!("127.0.0.1:{}", DEFAULT_METRICS_BASE + i), &format!("127.0.0.1:{}", base + 10 + i));
    }
    text
}

/// What the shell session starts with: strict mode, and `stop_keyshare` for the blocks that
/// need the services stopped (SIGTERM to `scripts/run`, then wait until every gRPC port is
/// closed).
const PREAMBLE: &str = r#"set -euo pipefail
stop_keyshare() {
  kill -TERM "$KEYSHARE_RUN_PID"
  local port deadline=$((SECONDS + 60))
  for port in $KEYSHARE_GRPC_PORTS; do
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
      ((SECONDS < deadline)) || { echo "Keyshare did not stop"; return 1; }
      sleep 0.2
    done
  done
}
"#;

#[tokio::test]
async fn scripts_run_the_walkthrough_and_the_operations_section_work() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let walkthrough = shell_blocks(&readme, "## Walkthrough with grpcurl");
    assert!(walkthrough.len() >= 5, "the walkthrough lost its commands");
    let operations = shell_blocks(&readme, "## Operations");
    let runnable = operations.iter().filter(|(_, mark)| !matches!(mark, Mark::Needs(_))).count();
    assert!(runnable >= 6, "the operations section lost its commands: {operations:?}");
    assert!(
        operations.iter().any(|(_, mark)| *mark == Mark::ServicesStopped),
        "no operations block runs with the services stopped"
    );

    let db = TestDatabase::create().await;
    let restored = RestoredDatabase(db.url.clone());
    restored.drop_it();
    let work = tempfile::tempdir().unwrap();
    // Free ports, so this test runs beside every other: gRPC on base..base+3, metrics on
    // base+10..base+13.
    let base = free_ports(2 * 10);
    let mut run = Command::new(root.join("scripts/run"))
        .current_dir(work.path())
        .env("KEYSHARE_PORT_BASE", base.to_string())
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

    // The walkthrough runs where a user would have a terminal open (mail and key.json land
    // there); the operations section from the repository root, as it says.
    let mut session = String::from(PREAMBLE);
    session.push_str(&script("walkthrough", &walkthrough));
    session.push_str(&format!("cd '{}'\n", root.display()));
    session.push_str(&script("operations", &operations));
    let session = moved_ports(&session, base);
    let grpc_ports = (0..SERVICES).map(|i| (base + i).to_string()).collect::<Vec<_>>().join(" ");
    let path = format!("{}:{}", tool("grpcurl").parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new("bash")
        .arg("-c")
        .arg(&session)
        .current_dir(work.path())
        .env("PATH", path)
        .env("DATABASE_URL", &db.url)
        .env("KEYSHARE_PROFILE", "debug")
        .env("KEYSHARE_RUN_PID", run.id().to_string())
        .env("KEYSHARE_GRPC_PORTS", grpc_ports)
        .output()
        .unwrap();

    // Stop it as an operator would, if the operations section has not already. (Ctrl-C's SIGINT
    // cannot be used here: a test harness starts children with SIGINT ignored, and a
    // non-interactive bash cannot trap a signal ignored at entry. scripts/run handles SIGTERM
    // the same way.)
    let _ = Command::new("kill").args(["-TERM", &run.id().to_string()]).status();
    let status = run.wait().unwrap();
    std::mem::forget(guard);

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "a README block failed:\n{stdout}\n{stderr}");
    let (walked, operated) = stdout.split_once("--- operations 0").unwrap_or_else(|| panic!("{stdout}"));
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
        r#""revokedSessions": 1"#,
    ] {
        assert!(walked.contains(expected), "{expected} missing from the walkthrough output:\n{walked}");
    }
    for expected in [
        // identity rotate-signing-key, then the two keys it leaves: the new one signs.
        "new signing key: ",
        "(2 rows)",
        // The KEK queries name the development KEK scripts/run generated.
        " dev1 ",
        // Every service's schema is in the dump.
        "TABLE DATA identity accounts",
        "TABLE DATA keyring keys",
        "TABLE DATA invitation invitations",
        "TABLE DATA authorizer usage_minutes",
        // The walkthrough's one key, in the restored database and after the in-place restore.
        " keys \n------\n    1\n(1 row)",
    ] {
        assert!(operated.contains(expected), "{expected:?} missing from the operations output:\n{operated}\n{stderr}");
    }
    let restored_counts = operated.matches(" keys \n------\n    1\n(1 row)").count();
    assert_eq!(restored_counts, 2, "both restores should show the key:\n{operated}");
    assert!(status.success(), "scripts/run exited with {status:?}");
}
