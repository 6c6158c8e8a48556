//! Token rotation as an operator does it: `tickserve serve
//! --auth-token-file`, rewrite the file, SIGHUP; the old token is refused
//! and the new one accepted from then on, and no token shows in the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

fn status(client: &reqwest::blocking::Client, http: &str, token: &str) -> u16 {
    client
        .post(format!("http://{http}/v2/repository/index"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn sighup_rereads_the_token_file() {
    let dir = tickserve_test_support::fresh_dir("tickserve-rotation");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "old-token-1234\n").unwrap();
    let common::Served {
        mut child,
        http,
        log,
        ..
    } = common::spawn_serve(&["--auth-token-file", tokens.to_str().unwrap()]);
    let logged = std::thread::spawn(move || log.map_while(Result::ok).collect::<Vec<_>>());
    let client = reqwest::blocking::Client::new();
    common::wait_ready(&client, &http, Duration::from_secs(30));
    assert_eq!(status(&client, &http, "old-token-1234"), 200);
    assert_eq!(status(&client, &http, "new-token-5678"), 401);

    std::fs::write(&tokens, "new-token-5678\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // The reload runs on the server's signal task: poll until it shows.
    let started = Instant::now();
    while status(&client, &http, "new-token-5678") != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new token was never accepted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&client, &http, "old-token-1234"), 401);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let log = logged.join().unwrap().join("\n");
    assert!(log.contains("bearer tokens reloaded"), "{log}");
    assert!(
        !log.contains("token-1234") && !log.contains("token-5678"),
        "a token was logged:\n{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
