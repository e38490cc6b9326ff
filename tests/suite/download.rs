//! Weights download against a local HTTP server on 127.0.0.1 that breaks the first transfer:
//! the client resumes with a Range request, renames the file into the cache, and it loads.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// Each request's (path, Range start).
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Serves `body` at any path. The first GET of each path sends headers for the whole file but
/// only `cut` bytes, then closes. Range requests get 206 with the rest. Logs each request's
/// (path, range) and serves `max_requests` requests at most.
fn serve(body: Vec<u8>, cut: usize, max_requests: usize) -> (String, RequestLog) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        for stream in listener.incoming().take(max_requests) {
            let Ok(mut s) = stream else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            log2.lock().unwrap().push((path.clone(), range.clone()));
            if path.contains("missing") {
                let _ = s.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            match range.and_then(|r| r.parse::<usize>().ok()) {
                Some(from) => {
                    let rest = &body[from..];
                    let _ = write!(s, "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n", rest.len(), from, body.len() - 1, body.len());
                    let _ = s.write_all(rest);
                }
                None => {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    if seen.insert(path) {
                        let _ = s.write_all(&body[..cut]); // broken transfer
                    } else {
                        let _ = s.write_all(&body);
                    }
                }
            }
        }
    });
    (addr, log)
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

#[test]
fn download_resumes_after_a_cut_transfer_and_loads() {
    let body = std::fs::read(fixture("tiny_a.full.pt")).unwrap();
    let (base, log) = serve(body.clone(), body.len() / 3, 16);
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("w").join("tiny_a.full.pt");
    marlin::hub::download(&format!("{base}/tiny_a.full.pt"), &dest, false).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let reqs = log.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(
        reqs[1].1.as_deref(),
        Some((body.len() / 3).to_string().as_str()),
        "{reqs:?}"
    );
    assert!(!t.path().join("w/tiny_a.full.pt.part").exists());

    let cfg = marlin::MarlinConfig::from_yaml_file(&fixture("tiny_a.yaml")).unwrap();
    let (m, _) = marlin::Marlin::<marlin::backend::Cpu>::load_file(
        &cfg,
        &dest,
        &[marlin::model::Part::Decoder],
        &Default::default(),
    )
    .unwrap();
    assert!(m.decoder.is_some());

    // A 404 is final: one request, a clear error, nothing left behind.
    let e = marlin::hub::download(&format!("{base}/missing.pt"), &t.path().join("m.pt"), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 404") && e.contains("pass --weights FILE"),
        "{e}"
    );
    assert!(!t.path().join("m.pt").exists());
}

#[test]
fn cli_download_fills_the_cache_and_cache_clean_empties_it() {
    let body = std::fs::read(fixture("tiny_a.encoder.pt")).unwrap();
    let (base, log) = serve(body.clone(), 1000, 16);
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_marlin"))
            .args(args)
            .env("MARLIN_HOME", &home)
            .env("MARLIN_DOWNLOAD_BASE", &base)
            .output()
            .unwrap()
    };
    let o = run(&["download", "marlin_vit_small_ytf", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cached = home.join("marlin_vit_small_ytf.encoder.pt");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        cached.display().to_string()
    );
    assert_eq!(std::fs::read(&cached).unwrap(), body);
    assert_eq!(log.lock().unwrap()[0].0, "/marlin_vit_small_ytf.encoder.pt");
    // Cached: no second request.
    let n = log.lock().unwrap().len();
    assert!(run(&["download", "marlin_vit_small_ytf", "--quiet"])
        .status
        .success());
    assert_eq!(log.lock().unwrap().len(), n);

    let o = run(&["info", cached.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("content:    encoder-only"), "{out}");
    assert!(out.contains("fits no released model"), "{out}");
    let o = run(&[
        "info",
        cached.to_str().unwrap(),
        "--config",
        fixture("tiny_a.yaml").to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("config:     tiny") && out.contains("encoder       0.04M parameters"),
        "{out}"
    );

    let o = run(&["cache", "clean"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("removed 1 files"));
    assert!(!cached.exists());
    let o = run(&["download", "vit_huge"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown model 'vit_huge'"));
}
