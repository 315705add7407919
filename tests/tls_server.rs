//! The admission server over real TLS on 127.0.0.1:0: admission answers, body limit, protocol
//! versions, certificate rotation through a kubelet-style `..data` swap, admin port, timeouts for
//! slow clients, and drain on shutdown.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::tls::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

fn setup() -> (tempfile::TempDir, Pki, ServingPair, CertDir) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA one");
    let pair = pki.serving_pair();
    let dir = CertDir::new(tmp.path(), &pair.chain_pem, &pair.key_pem);
    (tmp, pki, pair, dir)
}

#[tokio::test]
async fn admission_review_is_answered_with_its_uid_over_h2_and_http1() {
    let (_tmp, pki, pair, dir) = setup();
    let server = TestServer::start(&dir, |_| {}).await;

    let response = https_client(&pki.ca_pem())
        .post(server.url("/mutate?timeout=10s"))
        .header("content-type", "application/json")
        .body(review("0c1d2e3f-h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(body["response"]["uid"], "0c1d2e3f-h2");
    assert_eq!(body["response"]["allowed"], true);

    let mut conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    assert_eq!(presented_leaf(&conn), pair.leaf_der);
    let chain = conn.get_ref().1.peer_certificates().unwrap();
    assert_eq!(chain.len(), 2, "the whole chain from tls.crt is served");
    assert_eq!(chain[1], pki.ca_der());
    let answer = exchange(&mut conn, &post("/mutate", review("uid-http1").as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["response"]["uid"], "uid-http1");

    // Not the admission path: plain HTTP errors are fine there.
    let other = exchange(&mut conn, &post("/other", b"{}")).await.unwrap();
    assert_eq!(other.status, 404);
    let get = exchange(
        &mut conn,
        b"GET /mutate HTTP/1.1\r\nhost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(get.status, 405);
}

#[tokio::test]
async fn malformed_json_gets_http_200_and_an_invalid_review() {
    let (_tmp, pki, _pair, dir) = setup();
    let server = TestServer::start(&dir, |_| {}).await;
    let client = https_client(&pki.ca_pem());
    let paths = ["/mutate", "/validate", "/default"];
    let bodies = ["{not json", "", "[]", "{\"kind\":\"AdmissionReview\"}"];
    for (path, body) in paths
        .iter()
        .flat_map(|p| bodies.iter().map(move |b| (p, b)))
    {
        let response = client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(*body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path} body {body:?}");
        let review: serde_json::Value = response.json().await.unwrap();
        assert_eq!(review["kind"], "AdmissionReview", "{path} body {body:?}");
        assert_eq!(review["response"]["allowed"], false, "{path} body {body:?}");
        assert!(
            !review["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn over_limit_bodies_are_refused_without_reading_them_and_the_server_stays_healthy() {
    let (_tmp, pki, _pair, dir) = setup();
    let server = TestServer::start(&dir, |_| {}).await; // default limit: 4 MiB
    let config = http1_config(&[pki.ca_der()]);

    // Announced 5 MiB, only 1 KiB sent: the answer comes before the body, so nothing was buffered.
    let mut conn = tls_connect(server.addr, config.clone()).await.unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        5 * MIB
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&[b' '; 1024]).await.unwrap();
    conn.flush().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut conn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200);
    let refused = answer.json();
    assert_eq!(refused["response"]["allowed"], false);
    let message = refused["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("larger than the limit of 4194304 bytes"),
        "{message}"
    );

    // Chunked, no length announced: refused once the streamed bytes pass the limit.
    let mut conn = tls_connect(server.addr, config.clone()).await.unwrap();
    conn.write_all(
        b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..(4 * MIB / chunk.len() + 1) {
        conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        conn.write_all(&chunk).await.unwrap();
        conn.write_all(b"\r\n").await.unwrap();
    }
    conn.flush().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut conn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["response"]["allowed"], false);

    // Exactly at the limit is still read and answered for its uid.
    let mut padded = review("uid-at-limit").into_bytes();
    padded.resize(4 * MIB, b' ');
    let response = https_client(&pki.ca_pem())
        .post(server.url("/mutate"))
        .body(padded)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["response"]["uid"], "uid-at-limit");

    // Healthy afterwards, and the refusals were counted.
    let admin = http_client();
    let ready = admin.get(server.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = admin
        .get(server.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains("secrets_webhook_admissions_total{workload=\"none\",outcome=\"invalid\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_are_spoken() {
    let (_tmp, pki, _pair, dir) = setup();
    let server = TestServer::start(&dir, |_| {}).await;

    let conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    assert_eq!(
        conn.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let tls12_only = client_config(&[pki.ca_der()], &[&rustls::version::TLS12], b"http/1.1");
    let mut conn = tls_connect(server.addr, tls12_only).await.unwrap();
    assert_eq!(
        conn.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let answer = exchange(&mut conn, &post("/mutate", review("uid-tls12").as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.json()["response"]["uid"], "uid-tls12");

    // A TLS 1.1 ClientHello (no supported_versions extension) gets a protocol_version alert.
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2f, 0xc0, 0x13]); // ECDHE-RSA AES-GCM, AES-CBC
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pkcs1_sha256 (so only the version is wrong)
    hello.extend_from_slice(&[
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01,
    ]);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut reply = [0u8; 7];
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut reply),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply[0], 0x15, "an alert record, got {reply:?}");
    assert_eq!(
        &reply[5..],
        &[2, 70],
        "fatal protocol_version, got {reply:?}"
    );
}

#[tokio::test]
async fn rotated_certificate_is_served_to_new_connections_while_old_ones_keep_working() {
    let (tmp, pki_one, pair_one, mut dir) = setup();
    let _ = tmp.path();
    let pki_two = Pki::new("test CA two");
    let pair_two = pki_two.serving_pair();
    let server = TestServer::start(&dir, |o| o.header_timeout = Duration::from_secs(5)).await;
    let both = http1_config(&[pki_one.ca_der(), pki_two.ca_der()]);

    let mut old = tls_connect(server.addr, http1_config(&[pki_one.ca_der()]))
        .await
        .unwrap();
    assert_eq!(presented_leaf(&old), pair_one.leaf_der);
    let mut requests = 0;
    let mut ask = async |conn: &mut _| {
        requests += 1;
        let uid = format!("uid-{requests}");
        let answer = exchange(conn, &post("/mutate", review(&uid).as_bytes()))
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["response"]["uid"], uid.as_str());
    };
    ask(&mut old).await;

    dir.swap(&pair_two.chain_pem, &pair_two.key_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = tls_connect(server.addr, both.clone()).await.unwrap();
        if presented_leaf(&fresh) == pair_two.leaf_der {
            break;
        }
        assert_eq!(presented_leaf(&fresh), pair_one.leaf_der);
        assert!(Instant::now() < deadline, "new certificate never served");
        ask(&mut old).await; // the old connection keeps working meanwhile
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut fresh = tls_connect(server.addr, http1_config(&[pki_two.ca_der()]))
        .await
        .unwrap();
    ask(&mut fresh).await;
    assert!(
        tls_connect(server.addr, http1_config(&[pki_one.ca_der()]))
            .await
            .is_err(),
        "a client trusting only the old CA must now be refused"
    );
    // Same TCP/TLS connection as before the swap, still presenting and serving as before.
    assert_eq!(presented_leaf(&old), pair_one.leaf_der);
    ask(&mut old).await;
}

#[tokio::test]
async fn a_bad_new_pair_keeps_the_last_good_one() {
    let (_tmp, pki_one, pair_one, mut dir) = setup();
    let pki_two = Pki::new("test CA two");
    let pair_two = pki_two.serving_pair();
    let server = TestServer::start(&dir, |_| {}).await;
    let both = http1_config(&[pki_one.ca_der(), pki_two.ca_der()]);

    // Certificate and key that do not belong together, then garbage, then an empty key file.
    for (cert, key) in [
        (pair_two.chain_pem.as_str(), pair_one.key_pem.as_str()),
        ("not a certificate", pair_two.key_pem.as_str()),
        (pair_two.chain_pem.as_str(), ""),
    ] {
        dir.swap(cert, key);
        tokio::time::sleep(Duration::from_millis(500)).await; // five reload intervals
        let mut conn = tls_connect(server.addr, both.clone()).await.unwrap();
        assert_eq!(presented_leaf(&conn), pair_one.leaf_der);
        let answer = exchange(&mut conn, &post("/mutate", review("uid-kept").as_bytes()))
            .await
            .unwrap();
        assert_eq!(answer.json()["response"]["uid"], "uid-kept");
    }

    // The reloader is still alive: a good pair is picked up.
    dir.swap(&pair_two.chain_pem, &pair_two.key_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn = tls_connect(server.addr, both.clone()).await.unwrap();
        if presented_leaf(&conn) == pair_two.leaf_der {
            break;
        }
        assert!(Instant::now() < deadline, "good pair never picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admin_port_reports_liveness_readiness_and_metrics() {
    let (_tmp, pki, _pair, dir) = setup();
    let server = TestServer::start(&dir, |_| {}).await;
    let admin = http_client();
    let get = async |path: &str| {
        let response = admin.get(server.admin_url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    };

    assert_eq!(get("/livez").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    server.stores.ready.store(false, Ordering::SeqCst);
    assert_eq!(
        get("/readyz").await,
        (503, "caches not ready\n".to_string())
    );
    assert_eq!(get("/livez").await.0, 200, "not ready is still alive");
    server.stores.ready.store(true, Ordering::SeqCst);
    assert_eq!(get("/readyz").await.0, 200);

    let response = https_client(&pki.ca_pem())
        .post(server.url("/mutate"))
        .body(review("uid-metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "# TYPE secrets_webhook_admissions counter",
        "# TYPE secrets_webhook_admission_duration_seconds histogram",
        "# TYPE secrets_webhook_patches counter",
        "secrets_webhook_patches_total 0",
        "secrets_webhook_admissions_total{workload=\"none\",outcome=\"allowed\"} 1",
        "secrets_webhook_admission_duration_seconds_count{workload=\"none\"} 1",
    ] {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
    // The test certificate is valid until 2099: decades of seconds left.
    let expiry: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("secrets_webhook_certificate_expiry_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > 60.0 * 365.0 * 86400.0, "{expiry}");
    assert!(!text.contains("uid-metrics"));
}

#[tokio::test]
async fn slow_and_silent_clients_are_disconnected_and_do_not_block_others() {
    let (_tmp, pki, _pair, dir) = setup();
    let timeout = Duration::from_millis(800);
    let server = TestServer::start(&dir, |o| o.header_timeout = timeout).await;
    let limit = Duration::from_secs(5);

    // Silent TCP connections (no ClientHello) do not hold up anyone else...
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let started = Instant::now();
    let mut conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    let answer = exchange(&mut conn, &post("/mutate", review("uid-busy").as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() < timeout,
        "served while others were silent"
    );
    // An idle keep-alive connection is closed after the same time.
    let idle = time_until_closed(&mut conn, limit).await;
    assert!(idle >= timeout / 2, "idle connection closed after {idle:?}");
    // ...and are dropped once the handshake time is over.
    for tcp in &mut silent {
        let waited = time_until_closed(tcp, limit).await;
        assert!(waited < limit);
    }

    // TLS done, then nothing (HTTP/1.1 and HTTP/2): dropped after the timeout.
    for alpn in [b"http/1.1".as_slice(), b"h2".as_slice()] {
        let config = client_config(
            &[pki.ca_der()],
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            alpn,
        );
        let mut conn = tls_connect(server.addr, config).await.unwrap();
        let started = Instant::now();
        time_until_closed(&mut conn, limit).await;
        assert!(started.elapsed() >= timeout / 2, "closed too early");
    }

    // Headers started but never finished: dropped after the timeout.
    let mut conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    conn.write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    conn.flush().await.unwrap();
    time_until_closed(&mut conn, limit).await;

    // Headers complete, body trickling: answered `invalid` once the body time is over.
    let mut conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    conn.write_all(&post("/mutate", review("uid-slow").as_bytes())[..300])
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let answer = tokio::time::timeout(limit, read_response(&mut conn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200);
    let refused = answer.json();
    assert_eq!(refused["response"]["allowed"], false);
    assert!(
        refused["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not received within")
    );
}

#[tokio::test]
async fn shutdown_turns_not_ready_stops_accepting_and_lets_in_flight_requests_finish() {
    let (_tmp, pki, _pair, dir) = setup();
    let mut server = TestServer::start(&dir, |o| o.drain = Duration::from_secs(10)).await;
    let admin = http_client();

    // A request in flight: headers and half of the body sent.
    let request = post("/mutate", review("uid-in-flight").as_bytes());
    let (first, rest) = request.split_at(request.len() - 100);
    let mut conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    conn.write_all(first).await.unwrap();
    conn.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = admin.get(server.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await.unwrap(), "draining\n");
    assert!(
        tls_connect(server.addr, http1_config(&[pki.ca_der()]))
            .await
            .is_err(),
        "no new connections while draining"
    );

    conn.write_all(rest).await.unwrap();
    conn.flush().await.unwrap();
    let answer = read_response(&mut conn).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["response"]["uid"], "uid-in-flight");
    tokio::time::timeout(Duration::from_secs(5), server.finished())
        .await
        .expect("serve returns once drained");
}

#[tokio::test]
async fn drain_is_bounded_when_a_request_never_finishes() {
    let (_tmp, pki, _pair, dir) = setup();
    let mut server = TestServer::start(&dir, |o| {
        o.drain = Duration::from_millis(500);
        o.header_timeout = Duration::from_secs(30);
    })
    .await;
    let request = post("/mutate", review("uid-stuck").as_bytes());
    let mut conn = tls_connect(server.addr, http1_config(&[pki.ca_der()]))
        .await
        .unwrap();
    conn.write_all(&request[..request.len() - 10])
        .await
        .unwrap();
    conn.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    server.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), server.finished())
        .await
        .expect("serve returns after the drain time");
    assert!(started.elapsed() >= Duration::from_millis(400));
    time_until_closed(&mut conn, Duration::from_secs(5)).await;
}

/// `secrets-webhook serve --dev` as a real process: prints (on stdout) where it serves and the development CA,
/// admits over TLS trusted by that CA, reports ready, and exits 0 on SIGTERM.
#[tokio::test]
async fn serve_dev_process_admits_and_exits_0_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.yaml");
    std::fs::write(&config, "stores:\n  global: [api_token]\n").unwrap();
    let certs = tmp.path().join("dev-certs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_secrets-webhook"))
        .args(["serve", "--dev", "--log-format", "text"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--api-listen", "127.0.0.1:0"])
        .arg("--dev-cert-dir")
        .arg(&certs)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut port, mut admin) = (None, None);
    while port.is_none() || admin.is_none() {
        let line = lines.recv_timeout(Duration::from_secs(20)).unwrap();
        if let Some(rest) = line.split("https://localhost:").nth(1) {
            port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
        }
        if let Some(rest) = line.split("admin: http://").nth(1) {
            admin = rest.split('/').next().map(str::to_owned);
        }
    }
    let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let response = https_client(&ca)
        .post(format!("https://localhost:{}/mutate", port.unwrap()))
        .body(review("uid-dev-process"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["response"]["uid"], "uid-dev-process");
    let ready = http_client()
        .get(format!("http://{}/readyz", admin.unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}

/// One keep-alive HTTP/1.1 client in a loop until `stop`; returns (answered, refused before any
/// response byte, failed). A failure is anything else: a non-200, a wrong uid, a cut response.
async fn sustained_client(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    id: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (usize, usize, Vec<String>) {
    use std::sync::atomic::Ordering;
    let (mut answered, mut refused, mut failed) = (0, 0, Vec::new());
    let mut conn = None;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match tls_connect(addr, config.clone()).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            }
        }
        let Some(stream) = conn.as_mut() else {
            continue;
        };
        n += 1;
        let uid = format!("client-{id}-{n}");
        match exchange(stream, &post("/mutate", review(&uid).as_bytes())).await {
            Ok(answer)
                if answer.status == 200 && answer.json()["response"]["uid"] == uid.as_str() =>
            {
                answered += 1;
                if answer
                    .head
                    .to_ascii_lowercase()
                    .contains("connection: close")
                {
                    conn = None;
                }
            }
            Ok(answer) => failed.push(format!(
                "{uid}: status {} head {:?}",
                answer.status, answer.head
            )),
            // The server closed the idle keep-alive connection before reading this request
            // (between requests, as HTTP/1.1 allows): nothing was in flight; reconnect.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                refused += 1;
                conn = None;
            }
            Err(e) => {
                failed.push(format!("{uid}: {e}"));
                conn = None;
            }
        }
    }
    (answered, refused, failed)
}

/// `n` sustained clients running until [`Load::finish`].
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<(usize, usize, Vec<String>)>>,
}

impl Load {
    fn start(
        addr: std::net::SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
        n: usize,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..n)
            .map(|id| tokio::spawn(sustained_client(addr, config.clone(), id, stop.clone())))
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients; (answered, refused, failed) of each.
    async fn finish(self) -> Vec<(usize, usize, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for client in self.clients {
            out.push(client.await.unwrap());
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_sustained_load_fails_no_request() {
    let (_tmp, pki_one, _pair, mut dir) = setup();
    let pkis: Vec<Pki> = (0..3)
        .map(|i| Pki::new(&format!("rotation CA {i}")))
        .collect();
    let mut cas = vec![pki_one.ca_der()];
    cas.extend(pkis.iter().map(Pki::ca_der));
    let config = http1_config(&cas);
    let server = TestServer::start(&dir, |o| o.header_timeout = Duration::from_secs(5)).await;
    let load = Load::start(server.addr, config, 8);
    for pki in &pkis {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pair = pki.serving_pair();
        dir.swap(&pair.chain_pem, &pair.key_pem);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut total = 0;
    for (answered, refused, failed) in load.finish().await {
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(refused, 0, "no connection may be refused during rotation");
        total += answered;
    }
    assert!(total > 100, "sustained load answered only {total} requests");
    let last = pkis.last().unwrap();
    tls_connect(server.addr, http1_config(&[last.ca_der()]))
        .await
        .expect("new connections are served the last certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_sustained_load_completes_every_request_it_took() {
    let (_tmp, pki, _pair, dir) = setup();
    let drain = Duration::from_secs(3);
    let mut server = TestServer::start(&dir, |o| o.drain = drain).await;
    let config = http1_config(&[pki.ca_der()]);
    let load = Load::start(server.addr, config, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    server.begin_shutdown();
    tokio::time::timeout(drain + Duration::from_secs(2), server.finished())
        .await
        .expect("serve returns within the drain bound");
    let took = started.elapsed();
    let mut total = 0;
    for (answered, _refused, failed) in load.finish().await {
        assert!(
            failed.is_empty(),
            "requests the server took must complete: {failed:?}"
        );
        total += answered;
    }
    assert!(total > 50, "sustained load answered only {total} requests");
    assert!(took < drain + Duration::from_secs(1), "drained in {took:?}");
}

/// The install path without cert-manager: `secrets-webhook certs` (the real binary) makes the
/// serving certificate; the server serves it; a client that trusts only the printed caBundle and
/// connects by the Service DNS name — as the API server does — verifies it and is answered.
#[tokio::test]
async fn certs_subcommand_output_serves_tls_for_the_service_name() {
    use base64::Engine as _;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("certs");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_secrets-webhook"))
        .args(["certs", "--namespace", "iomete-system", "--out-dir"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ca_bundle = String::from_utf8(output.stdout).unwrap();
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(ca_bundle.trim())
        .unwrap();
    let ca = CertificateDer::from_pem_slice(&ca_pem).unwrap();

    let chain = std::fs::read_to_string(out_dir.join("tls.crt")).unwrap();
    let key = std::fs::read_to_string(out_dir.join("tls.key")).unwrap();
    let serving = tmp.path().join("serving");
    std::fs::create_dir(&serving).unwrap();
    let dir = CertDir::new(&serving, &chain, &key);
    let server = TestServer::start(&dir, |_| {}).await;

    let connect = |name: &'static str| {
        let config = http1_config(std::slice::from_ref(&ca));
        async move {
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from(name).unwrap(), tcp)
                .await
        }
    };
    let mut conn = connect("secrets-webhook.iomete-system.svc")
        .await
        .expect("verified by the caBundle");
    let answer = exchange(&mut conn, &post("/mutate", review("uid-certs").as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["response"]["uid"], "uid-certs");
    assert!(
        connect("other.iomete-system.svc").await.is_err(),
        "a name not in the certificate is refused"
    );
}
