//! The console in a real browser: headless Chromium driven through
//! chromedriver (Debian packages `chromium`, `chromium-driver`; `.ci/run`
//! installs them) with fantoccini. Every wait is for a condition on the
//! page, never a fixed delay.
//!
//! With `STEWARD_SCREENSHOTS=DIR` the tests save screenshots there;
//! `screenshots_of_the_demo` (ignored) makes the README's from `steward demo`.

use crate::console::{config, insert_product, wait_streaming, write_users, PASSWORD};
use crate::support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use steward_devkit::receiver::{Behaviour, Receiver};
use support::{free_port, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port and one browser session; both end on drop,
/// with every Chromium process chromedriver started (its process group), so
/// that a failing test leaves no browser behind.
struct Browser {
    client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn browser() -> Option<Browser> {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        println!("SKIPPED: chromium and chromedriver are not installed (apt-get install chromium chromium-driver)");
        return None;
    }
    let port = free_port();
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start chromedriver");
    wait_until("chromedriver listens", WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--window-size=1200,900",
            ],
        }
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a browser session");
    Some(Browser { client, driver })
}

/// Polls `check` on the page at `url` (loaded again each time) until it holds.
async fn wait_page(c: &Client, url: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        c.goto(url).await.unwrap();
        let source = c.source().await.unwrap();
        if check(&source) {
            return source;
        }
        assert!(
            started.elapsed() < WAIT,
            "timed out waiting for {what} at {url}:\n{source}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

async fn log_in(c: &Client, base: &str, user: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(
        path(c).await,
        "/login",
        "the console asks for a login first"
    );
    c.find(Locator::Id("login-user"))
        .await
        .unwrap()
        .send_keys(user)
        .await
        .unwrap();
    c.find(Locator::Id("login-password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    c.find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("user"))
        .await
        .unwrap();
    assert_eq!(text(c, "#user").await, user);
}

async fn log_out(c: &Client, base: &str) {
    c.find(Locator::Css("header form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("login-user"))
        .await
        .unwrap();
    c.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(
        path(c).await,
        "/login",
        "logged out: back to the login page"
    );
}

/// The action links and forms on the page.
async fn action_controls(c: &Client) -> usize {
    c.find_all(Locator::Css(
        "a[href^='/confirm/'], form[action^='/actions/']",
    ))
    .await
    .unwrap()
    .len()
}

/// A form POST made by script in the page (as a forger with the page's
/// cookie would): a form built on the fly and submitted; `with_csrf`
/// copies the page's token into it. Returns the answer's heading.
async fn post_from_page(
    c: &Client,
    action: &str,
    fields: &[(&str, &str)],
    with_csrf: bool,
) -> String {
    let fields: Vec<Value> = fields.iter().map(|(k, v)| json!([k, v])).collect();
    c.execute(
        "const [action, fields, withCsrf] = arguments; \
         const form = document.createElement('form'); \
         form.method = 'POST'; form.action = action; \
         const add = (n, v) => { const i = document.createElement('input'); \
           i.type = 'hidden'; i.name = n; i.value = v; form.appendChild(i); }; \
         if (withCsrf) add('csrf', document.querySelector('input[name=csrf]').value); \
         for (const [n, v] of fields) add(n, v); \
         document.body.appendChild(form); form.submit();",
        vec![json!(action), json!(fields), json!(with_csrf)],
    )
    .await
    .unwrap();
    let started = Instant::now();
    while path(c).await != action {
        assert!(started.elapsed() < WAIT, "the form was not submitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("main h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn confirm_with(c: &Client, comment: &str) -> String {
    c.find(Locator::Id("comment"))
        .await
        .unwrap()
        .send_keys(comment)
        .await
        .unwrap();
    c.find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("message"))
        .await
        .unwrap();
    text(c, "#message").await
}

fn screenshots() -> Option<PathBuf> {
    std::env::var_os("STEWARD_SCREENSHOTS").map(PathBuf::from)
}

async fn screenshot(c: &Client, name: &str) {
    if let Some(dir) = screenshots() {
        let png = c.screenshot().await.unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stewards_operators_and_viewers_in_a_real_browser() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let db = TestDb::new("console_browser");
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::FailKey {
        key: "9403".into(),
        status: 422,
    });
    let users = db.dir.path().join("users.toml");
    write_users(&users);
    let port = free_port();
    let strict = config(&db, &wms.url(), "^[A-Z]+_[0-9]+$", port, &users, "");
    let daemon = InProcess::start(steward_sinks::config::load(&strict).unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_streaming(&db).await;
    db.sql(&insert_product(9401, "bad-code"));
    db.sql(&insert_product(9402, "furn_9402"));
    db.sql(&insert_product(9403, "FURN_9403"));
    db.sql(&insert_product(9404, "no good"));

    // A steward logs in and finds the quarantined product and its reason.
    log_in(c, &base, "stella").await;
    let quarantine = format!("{base}/quarantine");
    wait_page(c, &quarantine, "9401 and 9404 in quarantine", |s| {
        s.contains("data-key=\"9401\"") && s.contains("data-key=\"9404\"")
    })
    .await;
    let reason = text(c, "tr[data-key='9401'] td.reason").await;
    assert!(
        reason.contains("internal references look like FURN_0001"),
        "{reason}"
    );
    c.find(Locator::Css("tr[data-key='9401'] a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(path(c).await, "/records/product/9401");
    assert_eq!(text(c, "#q-rule").await, "sku_format");
    assert!(text(c, "#withheld").await.contains("bad-code"));
    screenshot(c, "test-quarantined-record.png").await;

    // A POST without the CSRF token is refused, and changes nothing.
    let answer = post_from_page(
        c,
        "/actions/release",
        &[
            ("entity", "product"),
            ("key", "9401"),
            ("comment", "no token"),
        ],
        false,
    )
    .await;
    assert_eq!(answer, "Refused", "a POST without the CSRF token");
    assert!(text(c, "#message").await.contains("security token"));

    // Fixed in Odoo: it leaves the queue by itself.
    db.sql("UPDATE product_template SET default_code = 'FURN_9401' WHERE id = 9401");
    wait_page(c, &quarantine, "9401 gone from the quarantine", |s| {
        !s.contains("data-key=\"9401\"")
    })
    .await;

    // The steward re-evaluates a record (e.g. after asking purchasing):
    // it still fails, stays held, and the attempt is audited in their name.
    c.goto(&format!("{base}/records/product/9402"))
        .await
        .unwrap();
    assert_eq!(text(c, "#state").await, "quarantined");
    c.find(Locator::Id("release"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let message = confirm_with(c, "checked with purchasing").await;
    assert!(
        message.contains("product 9402 still fails and stays quarantined"),
        "{message}"
    );
    c.goto(&format!("{base}/records/product/9402"))
        .await
        .unwrap();
    assert_eq!(text(c, "#state").await, "quarantined");
    let history = text(c, ".audit-table").await;
    assert!(
        history.contains("checked with purchasing") && history.contains("stella"),
        "{history}"
    );
    // Corrected in Odoo: published, and its page says so.
    db.sql("UPDATE product_template SET default_code = 'FURN_9402' WHERE id = 9402");
    wait_until("9402 delivered", WAIT, || {
        wms.accepted_events().iter().any(|e| e["subject"] == "9402")
    })
    .await;
    wait_page(
        c,
        &format!("{base}/records/product/9402"),
        "9402 published",
        |s| s.contains("id=\"state\" class=\"good\">published<"),
    )
    .await;
    screenshot(c, "test-record.png").await;
    log_out(c, &base).await;

    // An operator replays the dead letter.
    log_in(c, &base, "otto").await;
    wms.set_behaviour(Behaviour::Ok);
    wait_page(
        c,
        &format!("{base}/dead-letters"),
        "the dead letter of 9403",
        |s| s.contains("data-key=\"9403\""),
    )
    .await;
    c.find(Locator::Css(
        "tr[data-key='9403'] a[href^='/confirm/replay/']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let message = confirm_with(c, "receiver fixed").await;
    assert!(message.contains("Replayed 1 dead letter"), "{message}");
    wait_until("9403 delivered after the replay", WAIT, || {
        wms.accepted_events().iter().any(|e| e["subject"] == "9403")
    })
    .await;
    wait_page(
        c,
        &format!("{base}/"),
        "the overview without dead letters",
        |s| s.contains("id=\"target-table\"") && s.contains("up to date"),
    )
    .await;
    screenshot(c, "test-overview.png").await;
    log_out(c, &base).await;

    // A viewer sees no action, and a forged POST is refused.
    log_in(c, &base, "vera").await;
    for page in ["/", "/quarantine", "/dead-letters", "/records/product/9404"] {
        c.goto(&format!("{base}{page}")).await.unwrap();
        assert_eq!(
            action_controls(c).await,
            0,
            "{page}: no action for a viewer"
        );
    }
    assert!(
        c.find(Locator::Id("withheld")).await.is_err(),
        "no withheld document for a viewer"
    );
    let answer = post_from_page(
        c,
        "/actions/release",
        &[
            ("entity", "product"),
            ("key", "9404"),
            ("comment", "forged"),
        ],
        true,
    )
    .await;
    assert_eq!(
        answer, "Not allowed",
        "a forged POST with the viewer's own token"
    );
    assert!(text(c, "#message").await.contains("needs the steward role"));
    c.goto(&format!("{base}/records/product/9404"))
        .await
        .unwrap();
    assert_eq!(text(c, "#state").await, "quarantined");
    log_out(c, &base).await;

    daemon.stop().await.unwrap();
}

/// The README's screenshots, from `steward demo` (so they show its
/// governance story): `STEWARD_SCREENSHOTS=docs cargo test --test it
/// console_browser::screenshots -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes the README's screenshots"]
async fn screenshots_of_the_demo() {
    use std::io::BufRead;
    let Some(dir) = screenshots() else {
        println!("SKIPPED: set STEWARD_SCREENSHOTS=DIR");
        return;
    };
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let mut demo = Command::new(env!("CARGO_BIN_EXE_steward"))
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let mut console = None;
    let mut reader = std::io::BufReader::new(stdout);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.trim_end().strip_prefix("  console: ") {
            console = Some(rest.to_string());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
        line.clear();
    }
    // The demo goes on printing until it stops.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    });
    let console = console.expect("the demo prints its console");
    let base = console
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let password = console
        .split("password ")
        .nth(1)
        .and_then(|p| p.split(';').next())
        .unwrap()
        .to_string();
    c.goto(&format!("{base}/")).await.unwrap();
    c.find(Locator::Id("login-user"))
        .await
        .unwrap()
        .send_keys("demo")
        .await
        .unwrap();
    c.find(Locator::Id("login-password"))
        .await
        .unwrap()
        .send_keys(&password)
        .await
        .unwrap();
    c.find(Locator::Id("login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("held-back"))
        .await
        .unwrap();
    std::fs::write(
        dir.join("console-overview.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    c.goto(&format!("{base}/quarantine")).await.unwrap();
    c.find(Locator::Css("tr[data-entity='bom'] a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("quarantine"))
        .await
        .unwrap();
    std::fs::write(
        dir.join("console-quarantined-record.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    c.goto(&format!("{base}/audit?decision=released"))
        .await
        .unwrap();
    c.find(Locator::Css(".audit-table td a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("history"))
        .await
        .unwrap();
    std::fs::write(
        dir.join("console-record.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    let pid = nix::unistd::Pid::from_raw(demo.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    assert!(demo.wait().unwrap().success());
    drain.join().unwrap();
}
