//! The web console against a real daemon: login, roles, CSRF, sessions,
//! the pages an operator reads (quarantine, dead letters, record view,
//! audit), the confirmed actions and their audit records, the read-only
//! API tokens, TLS. The real-browser tests are in `console_browser`.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use steward::console::users::{Role, Users};
use steward_devkit::receiver::{Behaviour, Receiver};
use support::{free_port, wait_until, InProcess, TestDb};

const WAIT: Duration = Duration::from_secs(30);
pub(crate) const PASSWORD: &str = "correct horse battery";

pub(crate) fn insert_product(id: u64, code: &str) -> String {
    format!(
        "INSERT INTO product_template (id, categ_id, uom_id, uom_po_id, detailed_type, type, default_code, name, list_price, active, tracking, purchase_line_warn, sale_line_warn) \
         VALUES ({id}, 1, 1, 1, 'product', 'product', '{code}', '{{\"en_US\": \"Product {id}\"}}', 10, true, 'none', 'no-message', 'no-message');"
    )
}

/// A users file with a viewer (vera), a steward (stella) and an operator
/// (otto), all with [`PASSWORD`], and an API token; returns the token.
pub(crate) fn write_users(path: &Path) -> String {
    let mut users = Users::default();
    for (name, role) in [
        ("vera", Role::Viewer),
        ("stella", Role::Steward),
        ("otto", Role::Operator),
    ] {
        users.add_user(name, role, PASSWORD, false).unwrap();
    }
    let token = users.add_token("mes").unwrap();
    users.save(path).unwrap();
    token
}

/// Products with a SKU rule (`pattern`), delivered to `wms`; the console
/// on `port` with `users`; `extra` appended to `[console]`.
pub(crate) fn config(
    db: &TestDb,
    url: &str,
    pattern: &str,
    port: u16,
    users: &Path,
    extra: &str,
) -> PathBuf {
    let mut text = db.config_text(&[("wms", url, &["product"])]);
    text.push_str(&format!(
        r#"
[[entities.product.rules]]
name = "sku_format"
regex = {{ field = "sku", pattern = "{pattern}" }}
message = "internal references look like FURN_0001"

[console]
listen = "127.0.0.1:{port}"
users_file = "{users}"
{extra}
"#,
        users = users.display()
    ));
    db.write_config(&text)
}

pub(crate) async fn wait_streaming(db: &TestDb) {
    let slot = format!("steward_{}", db.name);
    wait_until("steward streams from its slot", WAIT, || {
        db.sql(&format!(
            "SELECT s.active FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND r.state = 'streaming'"
        ))
        .lines()
        .any(|l| l.trim() == "t")
    })
    .await;
}

/// A person's browser without JavaScript: a session cookie and the page's
/// CSRF token.
struct Web {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
    csrf: Option<String>,
}

struct Page {
    status: u16,
    headers: HeaderMap,
    body: String,
}

fn form(fields: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        s.append_pair(k, v);
    }
    s.finish()
}

impl Web {
    fn new(base: &str) -> Web {
        // reqwest is built without a default crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Web {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
            csrf: None,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Page {
        let request = match &self.cookie {
            Some(c) => request.header(COOKIE, c),
            None => request,
        };
        let response = request.send().await.expect("the console answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        Page {
            status,
            headers,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let page = self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await;
        if let Some(csrf) = csrf_of(&page.body) {
            self.csrf = Some(csrf);
        }
        page
    }

    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form(fields)),
        )
        .await
    }

    /// Posts with this session's CSRF token.
    async fn act(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        let csrf = self.csrf.clone().expect("a page was read first");
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.post(path, &all).await
    }

    async fn login(base: &str, user: &str) -> Web {
        let mut web = Web::new(base);
        let page = web
            .post(
                "/login",
                &[("user", user), ("password", PASSWORD), ("next", "/")],
            )
            .await;
        assert_eq!(page.status, 303, "{user} logs in: {}", page.body);
        let cookie = page.headers[SET_COOKIE].to_str().unwrap().to_string();
        for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(cookie.contains(part), "{cookie}");
        }
        assert!(
            !cookie.contains("Secure"),
            "plain HTTP on loopback: {cookie}"
        );
        web.cookie = Some(cookie.split(';').next().unwrap().to_string());
        let home = web.get("/").await;
        assert_eq!(home.status, 200, "{}", home.body);
        assert!(web.csrf.is_some(), "every page carries the CSRF token");
        web
    }
}

fn csrf_of(body: &str) -> Option<String> {
    let at = body.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(body[at..].split('"').next()?.to_string())
}

async fn api(base: &str, token: Option<&str>, method: reqwest::Method, path: &str) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut request = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_csrf_and_sessions_guard_every_action_and_each_is_audited() {
    let db = TestDb::new("console_roles");
    let wms = Receiver::start().await.unwrap();
    wms.set_behaviour(Behaviour::FailKey {
        key: "9302".into(),
        status: 422,
    });
    let users = db.dir.path().join("users.toml");
    let token = write_users(&users);
    let port = free_port();
    let config = config(&db, &wms.url(), "^[A-Z]+_[0-9]+$", port, &users, "");
    let daemon = InProcess::start(steward_sinks::config::load(&config).unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_streaming(&db).await;

    // Nothing without logging in.
    let mut anonymous = Web::new(&base);
    let page = anonymous.get("/quarantine?entity=product").await;
    assert_eq!(page.status, 303);
    assert_eq!(
        page.headers[LOCATION],
        "/login?next=%2Fquarantine%3Fentity%3Dproduct"
    );
    let page = anonymous.get("/login").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Log in"), "{}", page.body);
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"),
        "{:?}",
        page.headers
    );
    let page = anonymous
        .post(
            "/login",
            &[("user", "stella"), ("password", "wrong password!")],
        )
        .await;
    assert_eq!(page.status, 401);
    assert!(page.body.contains("wrong password"), "{}", page.body);
    assert!(!page.headers.contains_key(SET_COOKIE));
    let page = anonymous
        .post(
            "/actions/release",
            &[("entity", "product"), ("key", "1"), ("comment", "x")],
        )
        .await;
    assert_eq!(page.status, 403, "a POST without a session");

    db.sql(&insert_product(9301, "FURN_9301"));
    db.sql(&insert_product(9302, "FURN_9302"));
    db.sql(&insert_product(9303, "bad-code"));

    // A viewer reads the queue, the reason and the record; no buttons.
    let mut vera = Web::login(&base, "vera").await;
    let mut page = vera.get("/quarantine").await;
    for _ in 0..150 {
        if page.body.contains("product 9303") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        page = vera.get("/quarantine").await;
    }
    assert!(
        page.body
            .contains("internal references look like FURN_0001"),
        "{}",
        page.body
    );
    assert!(
        !page.body.contains("/confirm/"),
        "a viewer sees no action: {}",
        page.body
    );
    let record = vera.get("/records/product/9303").await;
    assert_eq!(record.status, 200, "{}", record.body);
    assert!(record.body.contains("sku_format"), "{}", record.body);
    assert!(
        !record.body.contains("id=\"withheld\""),
        "withheld document hidden from viewers"
    );
    assert!(
        !record.body.contains("id=\"row\""),
        "source row hidden from viewers"
    );
    assert!(!record.body.contains("/confirm/"), "{}", record.body);
    // A forged POST with the viewer's own valid token: refused by role.
    let page = vera
        .act(
            "/actions/release",
            &[
                ("entity", "product"),
                ("key", "9303"),
                ("comment", "forged"),
            ],
        )
        .await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(
        page.body.contains("needs the steward role"),
        "{}",
        page.body
    );
    let page = vera.get("/confirm/release/product/9303").await;
    assert_eq!(page.status, 403);

    // A steward: the withheld document and the button; the CSRF token is checked.
    let mut stella = Web::login(&base, "stella").await;
    let record = stella.get("/records/product/9303").await;
    assert!(record.body.contains("id=\"withheld\""), "{}", record.body);
    assert!(record.body.contains("bad-code"), "{}", record.body);
    assert!(record.body.contains("/confirm/release/product/9303"));
    for csrf in [None, Some(""), Some("forged-token")] {
        let mut fields = vec![("entity", "product"), ("key", "9303"), ("comment", "ok")];
        if let Some(c) = csrf {
            fields.push(("csrf", c));
        }
        let page = stella.post("/actions/release", &fields).await;
        assert_eq!(page.status, 403, "csrf {csrf:?}: {}", page.body);
        assert!(page.body.contains("security token"), "{}", page.body);
    }
    assert_ne!(stella.csrf, vera.csrf, "each session its own token");
    // Sent from another site (with a stolen token even): refused by origin.
    let page = stella
        .send(
            stella
                .http
                .post(format!("{base}/actions/release"))
                .header("origin", "https://evil.example")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form(&[
                    ("csrf", stella.csrf.as_deref().unwrap()),
                    ("entity", "product"),
                    ("key", "9303"),
                    ("comment", "cross-site"),
                ])),
        )
        .await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("another site"), "{}", page.body);
    let page = stella
        .act(
            "/actions/release",
            &[("entity", "product"), ("key", "9303"), ("comment", "")],
        )
        .await;
    assert_eq!(page.status, 400, "a comment is required: {}", page.body);
    let page = stella
        .act(
            "/actions/release",
            &[
                ("entity", "product"),
                ("key", "9303"),
                ("comment", "checked with purchasing"),
            ],
        )
        .await;
    assert_eq!(page.status, 409, "still failing: {}", page.body);
    assert!(page.body.contains("still fails"), "{}", page.body);
    // Dead letters need an operator.
    let page = stella
        .act(
            "/actions/replay",
            &[("target", "wms"), ("comment", "retry")],
        )
        .await;
    assert_eq!(page.status, 403, "{}", page.body);

    // An operator replays the dead letter.
    let mut otto = Web::login(&base, "otto").await;
    let mut dlq = otto.get("/dead-letters?target=wms").await;
    for _ in 0..150 {
        if dlq.body.contains("data-key=\"9302\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        dlq = otto.get("/dead-letters?target=wms").await;
    }
    assert!(dlq.body.contains("data-key=\"9302\""), "{}", dlq.body);
    assert!(dlq.body.contains("/confirm/replay/wms?id="), "{}", dlq.body);
    let id = dlq
        .body
        .split("data-id=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let confirm = otto.get(&format!("/confirm/replay/wms?id={id}")).await;
    assert_eq!(confirm.status, 200);
    assert!(
        confirm.body.contains("name=\"comment\""),
        "{}",
        confirm.body
    );
    wms.set_behaviour(Behaviour::Ok);
    let page = otto
        .act(
            "/actions/replay",
            &[
                ("target", "wms"),
                ("id", &id),
                ("comment", "receiver fixed"),
            ],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Replayed 1 dead letter"),
        "{}",
        page.body
    );
    wait_until("9302 delivered after the replay", WAIT, || {
        wms.accepted_events().iter().any(|e| e["subject"] == "9302")
    })
    .await;
    let mut record = otto.get("/records/product/9302").await;
    for _ in 0..150 {
        if record.body.contains("class=\"acknowledged\">version") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        record = otto.get("/records/product/9302").await;
    }
    assert!(
        record.body.contains("class=\"acknowledged\">version"),
        "the version the target acknowledged, once replayed: {}",
        record.body
    );
    let page = otto
        .act(
            "/actions/flush",
            &[("target", "wms"), ("comment", "end of day")],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);

    let page = otto
        .act(
            "/actions/drop",
            &[("target", "wms"), ("comment", "nothing left")],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Dropped 0 dead letter"), "{}", page.body);
    let page = stella
        .act(
            "/actions/reset",
            &[("target", "wms"), ("comment", "resync")],
        )
        .await;
    assert_eq!(page.status, 403, "a reset needs an operator: {}", page.body);
    let page = otto
        .act(
            "/actions/reset",
            &[("target", "wms"), ("comment", "resync after the outage")],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Reset started"), "{}", page.body);
    let page = otto
        .act("/actions/flush", &[("target", "nope"), ("comment", "typo")])
        .await;
    assert_eq!(page.status, 404, "{}", page.body);
    assert!(page.body.contains("no target `nope`"), "{}", page.body);

    // The audit trail names the console users, with their comments.
    let audit = otto.get("/audit?user=otto").await;
    assert!(audit.body.contains("dlq_replayed"), "{}", audit.body);
    assert!(audit.body.contains("receiver fixed"), "{}", audit.body);
    assert!(audit.body.contains("end of day"), "{}", audit.body);
    assert!(
        audit.body.contains("resync after the outage"),
        "{}",
        audit.body
    );
    let audit = otto.get("/audit?user=stella&entity=product&key=9303").await;
    assert!(
        audit.body.contains("checked with purchasing"),
        "{}",
        audit.body
    );
    let audit = otto.get("/audit?user=vera").await;
    assert!(
        audit.body.contains("No audit records"),
        "the forged POST did nothing: {}",
        audit.body
    );
    let audit = otto.get("/audit?since=yesterday").await;
    assert!(audit.body.contains("is not a time"), "{}", audit.body);
    // A window that ends before today holds none of today's actions.
    let audit = otto.get("/audit?user=otto&until=2000-01-01").await;
    assert!(audit.body.contains("No audit records"), "{}", audit.body);
    let audit = otto.get("/audit?user=otto&until=2999-01-01").await;
    assert!(audit.body.contains("receiver fixed"), "{}", audit.body);

    // The overview: targets and per-entity counts.
    let overview = vera.get("/").await;
    assert!(
        overview.body.contains("id=\"target-table\""),
        "{}",
        overview.body
    );
    assert!(overview.body.contains(">wms<"), "{}", overview.body);
    assert!(
        overview.body.contains("/quarantine?entity=product"),
        "{}",
        overview.body
    );

    // Read-only API tokens.
    let (status, body) = api(&base, Some(&token), reqwest::Method::GET, "/api/v1/status").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targets"][0]["name"], "wms", "{body}");
    let (status, body) = api(
        &base,
        Some(&token),
        reqwest::Method::GET,
        "/api/v1/records/product/9303",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "quarantined", "{body}");
    assert_eq!(body["quarantine"]["rule"], "sku_format", "{body}");
    assert!(
        body.get("row").is_none(),
        "no source row for a token: {body}"
    );
    assert!(body["quarantine"].get("document").is_none(), "{body}");
    let (status, body) = api(&base, Some(&token), reqwest::Method::POST, "/api/v1/status").await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "read_only", "{body}");
    let (status, _) = api(
        &base,
        Some("stw_forged"),
        reqwest::Method::GET,
        "/api/v1/status",
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = api(&base, None, reqwest::Method::GET, "/api/v1/status").await;
    assert_eq!(status, 401);

    // Fixed in Odoo: it leaves the queue by itself.
    db.sql("UPDATE product_template SET default_code = 'FURN_9303' WHERE id = 9303");
    let mut gone = false;
    for _ in 0..150 {
        if !vera.get("/quarantine").await.body.contains("product 9303") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "9303 left the quarantine");

    // Logout ends the session for good.
    let old = vera.cookie.clone();
    let page = vera.act("/logout", &[]).await;
    assert_eq!(page.status, 303);
    assert_eq!(page.headers[LOCATION], "/login");
    vera.cookie = old;
    assert_eq!(
        vera.get("/").await.status,
        303,
        "the old cookie opens nothing"
    );

    // A user removed from the file is logged out at the next request.
    let mut file = Users::load(&users).unwrap();
    file.users.remove("stella");
    file.save(&users).unwrap();
    assert_eq!(stella.get("/").await.status, 303);
    assert_eq!(otto.get("/").await.status, 200);

    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_rate_limited_per_user() {
    let db = TestDb::new("console_limit");
    let wms = Receiver::start().await.unwrap();
    let users = db.dir.path().join("users.toml");
    write_users(&users);
    let port = free_port();
    let config = config(&db, &wms.url(), "^.*$", port, &users, "");
    let daemon = InProcess::start(steward_sinks::config::load(&config).unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let web = Web::new(&base);
    wait_until("the console listens", WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let page = web
            .post(
                "/login",
                &[("user", "otto"), ("password", "guess guess guess")],
            )
            .await;
        statuses.push(page.status);
    }
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(statuses[5..], [429, 429], "{statuses:?}");
    // Even the right password waits now.
    let page = web
        .post("/login", &[("user", "otto"), ("password", PASSWORD)])
        .await;
    assert_eq!(page.status, 429);
    // Another user from the same address is not held back yet.
    let page = web
        .post("/login", &[("user", "vera"), ("password", PASSWORD)])
        .await;
    assert_eq!(page.status, 303);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_the_console_speaks_https_with_secure_cookies() {
    let db = TestDb::new("console_tls");
    let wms = Receiver::start().await.unwrap();
    let pki = steward_devkit::tls::TestPki::generate(db.dir.path()).unwrap();
    let users = db.dir.path().join("users.toml");
    write_users(&users);
    let port = free_port();
    let config = config(
        &db,
        &wms.url(),
        "^.*$",
        port,
        &users,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    );
    let daemon = InProcess::start(steward_sinks::config::load(&config).unwrap());
    wait_until("the console listens", WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let https = reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates({
                    let mut roots = rustls::RootCertStore::empty();
                    for c in rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca_cert).unwrap()
                    {
                        roots.add(c.unwrap()).unwrap();
                    }
                    roots
                })
                .with_no_client_auth(),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = https
        .post(format!("https://localhost:{port}/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("user", "vera"), ("password", PASSWORD)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 303);
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.contains("; Secure"), "{cookie}");
    // Plain HTTP gets nothing.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/login")).await;
    assert!(plain.is_err(), "{plain:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_held_back_records_and_links_between_records() {
    let db = TestDb::new("console_links");
    db.sql("ALTER TABLE product_template ADD COLUMN x_lifecycle_state varchar DEFAULT 'approved'");
    let wms = Receiver::start().await.unwrap();
    let users = db.dir.path().join("users.toml");
    write_users(&users);
    let port = free_port();
    let mut text = db.config_text(&[("wms", &wms.url(), &["product", "bom"])]);
    text = text.replacen(
        "[entities.product]\ntable = \"product_template\"\n",
        "[entities.product]\ntable = \"product_template\"\npublish_when = \"row.x_lifecycle_state == 'approved'\"\n",
        1,
    );
    text.push_str(&format!(
        r#"
[[entities.bom.rules]]
name = "product_ready"
reference = {{ field = "product_tmpl_id", entity = "product" }}

[console]
listen = "127.0.0.1:{port}"
users_file = "{users}"
"#,
        users = users.display()
    ));
    let config = db.write_config(&text);
    let daemon = InProcess::start(steward_sinks::config::load(&config).unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_streaming(&db).await;
    db.sql(&format!(
        "{} UPDATE product_template SET x_lifecycle_state = 'draft' WHERE id = 9501; \
         INSERT INTO mrp_bom (id, product_tmpl_id, product_uom_id, code, type, ready_to_produce, consumption, product_qty, active) \
         VALUES (9601, 9501, 1, 'BOM-9601', 'normal', 'all_available', 'flexible', 1, true);",
        insert_product(9501, "FURN_9501")
    ));

    let mut vera = Web::login(&base, "vera").await;
    let mut approvals = vera.get("/approvals").await;
    for _ in 0..150 {
        if approvals.body.contains("product 9501") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        approvals = vera.get("/approvals").await;
    }
    assert!(
        approvals.body.contains("href=\"/records/product/9501\""),
        "{}",
        approvals.body
    );
    assert!(
        approvals
            .body
            .contains("row.x_lifecycle_state == &#39;approved&#39;")
            || approvals
                .body
                .contains("row.x_lifecycle_state == &#x27;approved&#x27;"),
        "the gate is shown: {}",
        approvals.body
    );
    let overview = vera.get("/").await;
    assert!(
        overview
            .body
            .contains("1 bom record blocked by 1 product pending approval"),
        "{}",
        overview.body
    );
    let bom = vera.get("/records/bom/9601").await;
    assert!(
        bom.body.contains("blocked (waits for another record)"),
        "{}",
        bom.body
    );
    assert!(
        bom.body
            .contains("<a href=\"/records/product/9501\">product 9501</a>"),
        "the BOM links to the product it waits for: {}",
        bom.body
    );
    let product = vera.get("/records/product/9501").await;
    assert!(
        product.body.contains("pending approval"),
        "{}",
        product.body
    );
    assert!(
        product
            .body
            .contains("<a href=\"/records/bom/9601\">bom 9601</a>"),
        "the product links to the BOM it holds back: {}",
        product.body
    );
    let (status, _) = (vera.get("/records/nope/1").await.status, ());
    assert_eq!(status, 404);

    // Approved in Odoo: both published, nothing pending.
    db.sql("UPDATE product_template SET x_lifecycle_state = 'approved' WHERE id = 9501");
    wms.wait_for_events(2, WAIT).await;
    let mut approvals = vera.get("/approvals").await;
    for _ in 0..150 {
        if !approvals.body.contains("product 9501") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        approvals = vera.get("/approvals").await;
    }
    assert!(
        !approvals.body.contains("product 9501"),
        "{}",
        approvals.body
    );
    let bom = vera.get("/records/bom/9601").await;
    assert!(bom.body.contains(">published<"), "{}", bom.body);
    daemon.stop().await.unwrap();
}
