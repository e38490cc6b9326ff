//! The key-value store the ranks meet through, the design of torch's TCPStore: rank 0 serves it
//! on `MASTER_ADDR:MASTER_PORT`, every rank (rank 0 too) is a client. It carries Gloo's
//! rendezvous (each rank's listening addresses), the NCCL id, the start check of configs and
//! weights, and which ranks are gone: the server sees a rank's connection close without a
//! goodbye, so a rank whose peer died can name it.
//!
//! Wire format, one request then one reply on a connection: a request is an op byte and
//! length-prefixed (u32 little endian) fields; a reply is a status byte (0 ok, 1 timed out) and
//! one length-prefixed payload.

use super::DistError;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const HELLO: u8 = 1;
const SET: u8 = 2;
const GET: u8 = 3;
const ADD: u8 = 4;
const GONE: u8 = 5;
const BYE: u8 = 6;

#[derive(Default)]
struct State {
    kv: HashMap<String, Vec<u8>>,
    /// Ranks whose connection closed without a goodbye.
    gone: BTreeSet<u32>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// The server rank 0 runs in background threads for the life of the process.
pub struct Server {
    pub addr: SocketAddr,
}

impl Server {
    /// Listen on every interface at `port` (as torch's TCPStore does).
    pub fn start(port: u16) -> Result<Self, DistError> {
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| DistError::Store {
            addr: format!("0.0.0.0:{port}"),
            msg: format!(
                "rank 0 cannot listen there ({e}): another job may hold the port; set \
                 MASTER_PORT to a free one"
            ),
        })?;
        let addr = listener.local_addr().map_err(|e| DistError::Store {
            addr: format!("0.0.0.0:{port}"),
            msg: e.to_string(),
        })?;
        let shared: Shared = Arc::default();
        std::thread::Builder::new()
            .name("marlin-store".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let s = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("marlin-store-conn".into())
                        .spawn(move || serve(conn, s));
                }
            })
            .map_err(|e| DistError::Store {
                addr: addr.to_string(),
                msg: e.to_string(),
            })?;
        Ok(Self { addr })
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_field(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_u32(r)? as usize;
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn write_field(w: &mut impl Write, v: &[u8]) -> std::io::Result<()> {
    w.write_all(&(v.len() as u32).to_le_bytes())?;
    w.write_all(v)
}

fn u64_of(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    u64::from_le_bytes(b)
}

/// One client connection: requests until it closes. A close without BYE marks its rank gone.
fn serve(conn: TcpStream, shared: Shared) {
    let _ = conn.set_nodelay(true);
    let Ok(clone) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut w = BufWriter::new(clone);
    let mut rank: Option<u32> = None;
    let (lock, cv) = &*shared;
    let result: std::io::Result<()> = (|| loop {
        let mut op = [0u8; 1];
        r.read_exact(&mut op)?;
        let (status, payload): (u8, Vec<u8>) = match op[0] {
            HELLO => {
                let who = u64_of(&read_field(&mut r)?) as u32;
                rank = Some(who);
                if let Ok(mut st) = lock.lock() {
                    st.gone.remove(&who);
                }
                (0, Vec::new())
            }
            SET => {
                let key = String::from_utf8_lossy(&read_field(&mut r)?).into_owned();
                let value = read_field(&mut r)?;
                if let Ok(mut st) = lock.lock() {
                    st.kv.insert(key, value);
                }
                cv.notify_all();
                (0, Vec::new())
            }
            GET => {
                let key = String::from_utf8_lossy(&read_field(&mut r)?).into_owned();
                let timeout = Duration::from_millis(u64_of(&read_field(&mut r)?));
                let deadline = Instant::now() + timeout;
                let mut found = None;
                if let Ok(mut st) = lock.lock() {
                    loop {
                        if let Some(v) = st.kv.get(&key) {
                            found = Some(v.clone());
                            break;
                        }
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match cv.wait_timeout(st, deadline - now) {
                            Ok((g, _)) => st = g,
                            Err(_) => return Ok(()),
                        }
                    }
                }
                match found {
                    Some(v) => (0, v),
                    None => (1, Vec::new()),
                }
            }
            ADD => {
                let key = String::from_utf8_lossy(&read_field(&mut r)?).into_owned();
                let delta = u64_of(&read_field(&mut r)?) as i64;
                let mut value = 0i64;
                if let Ok(mut st) = lock.lock() {
                    let old = st.kv.get(&key).map(|v| u64_of(v) as i64).unwrap_or(0);
                    value = old + delta;
                    st.kv.insert(key, value.to_le_bytes().to_vec());
                }
                cv.notify_all();
                (0, value.to_le_bytes().to_vec())
            }
            GONE => {
                let gone: Vec<u8> = lock
                    .lock()
                    .map(|st| st.gone.iter().flat_map(|r| r.to_le_bytes()).collect())
                    .unwrap_or_default();
                (0, gone)
            }
            BYE => {
                rank = None;
                w.write_all(&[0])?;
                write_field(&mut w, &[])?;
                w.flush()?;
                return Ok(());
            }
            _ => return Ok(()),
        };
        w.write_all(&[status])?;
        write_field(&mut w, &payload)?;
        w.flush()?;
    })();
    let _ = result;
    if let Some(who) = rank {
        if let Ok(mut st) = lock.lock() {
            st.gone.insert(who);
        }
        cv.notify_all();
    }
}

/// A rank's connection to the store.
pub struct Client {
    conn: Mutex<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
    /// `MASTER_ADDR:MASTER_PORT`, for messages.
    pub addr: String,
    /// This socket's own address: the interface that reaches rank 0 (where Gloo listens).
    pub local_ip: std::net::IpAddr,
}

impl Client {
    /// Connect to the store at `host:port`, retrying until `timeout` (rank 0 may start
    /// later), and say who we are.
    pub fn connect(host: &str, port: u16, rank: u32, timeout: Duration) -> Result<Self, DistError> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let err = |msg: String| DistError::Store {
            addr: addr.clone(),
            msg,
        };
        let stream = loop {
            let last = match addr.to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = String::from("no address");
                    let mut found = None;
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                            Ok(s) => {
                                found = Some(s);
                                break;
                            }
                            Err(e) => last = e.to_string(),
                        }
                    }
                    if let Some(s) = found {
                        break s;
                    }
                    last
                }
                Err(e) => format!("cannot resolve the host ({e})"),
            };
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "rank 0's store did not answer within {} s ({last}): is rank 0 running, \
                     and are MASTER_ADDR/MASTER_PORT the same on every rank?",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = stream.set_nodelay(true);
        let local_ip = stream.local_addr().map_err(|e| err(e.to_string()))?.ip();
        let other = stream.try_clone().map_err(|e| err(e.to_string()))?;
        let c = Self {
            conn: Mutex::new((BufReader::new(stream), BufWriter::new(other))),
            addr: addr.clone(),
            local_ip,
        };
        c.call(HELLO, &[&rank.to_le_bytes()], None)?;
        Ok(c)
    }

    /// One request; `wait` bounds how long the reply may take beyond the socket's own pace.
    fn call(
        &self,
        op: u8,
        fields: &[&[u8]],
        wait: Option<Duration>,
    ) -> Result<(u8, Vec<u8>), DistError> {
        let gone = |e: std::io::Error| DistError::RankGone {
            rank: 0,
            detail: format!("its store at {} stopped answering ({e})", self.addr),
        };
        let mut guard = self.conn.lock().map_err(|_| DistError::Store {
            addr: self.addr.clone(),
            msg: "a thread failed while holding the store connection".into(),
        })?;
        let (r, w) = &mut *guard;
        // A reply that does not come within its wait and half a minute means rank 0 is stuck.
        let read_timeout = wait.unwrap_or_default() + Duration::from_secs(30);
        r.get_ref()
            .set_read_timeout(Some(read_timeout))
            .map_err(gone)?;
        w.write_all(&[op]).map_err(gone)?;
        for f in fields {
            write_field(w, f).map_err(gone)?;
        }
        w.flush().map_err(gone)?;
        let mut status = [0u8; 1];
        r.read_exact(&mut status).map_err(gone)?;
        let payload = read_field(r).map_err(gone)?;
        Ok((status[0], payload))
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        self.call(SET, &[key.as_bytes(), value], None).map(|_| ())
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it; None on timeout.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, DistError> {
        let ms = (timeout.as_millis() as u64).to_le_bytes();
        let (status, v) = self.call(GET, &[key.as_bytes(), &ms], Some(timeout))?;
        Ok((status == 0).then_some(v))
    }

    /// Add `delta` to the counter `key`; its new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, DistError> {
        let (_, v) = self.call(ADD, &[key.as_bytes(), &delta.to_le_bytes()], None)?;
        Ok(u64_of(&v) as i64)
    }

    /// The ranks whose connection to the store closed without a goodbye.
    pub fn gone(&self) -> Result<Vec<u32>, DistError> {
        let (_, v) = self.call(GONE, &[], None)?;
        Ok(v.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A clean goodbye: this rank is not counted as gone.
    pub fn bye(&self) {
        let _ = self.call(BYE, &[], Some(Duration::from_secs(5)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_add_and_gone() {
        let server = Server::start(0).unwrap();
        let port = server.addr.port();
        let a = Client::connect("127.0.0.1", port, 0, Duration::from_secs(5)).unwrap();
        let b = Client::connect("127.0.0.1", port, 1, Duration::from_secs(5)).unwrap();
        assert_eq!(a.get("k", Duration::from_millis(50)).unwrap(), None);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            b.set("k", b"v").unwrap();
            assert_eq!(b.add("n", 2).unwrap(), 2);
            drop(b);
        });
        assert_eq!(
            a.get("k", Duration::from_secs(5)).unwrap().as_deref(),
            Some(&b"v"[..])
        );
        t.join().unwrap();
        assert_eq!(a.add("n", 3).unwrap(), 5);
        // b closed without a goodbye: rank 1 is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.gone().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(a.gone().unwrap(), vec![1]);
        a.bye();
    }
}
