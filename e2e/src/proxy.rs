//! A TCP proxy between a client and a server, that can black-hole the
//! path: while black-holed, connections stay open but no byte moves either
//! way (what a network partition looks like, unlike a clean close), and new
//! connections are accepted and left hanging. Restoring closes the stuck
//! connections, so clients reconnect through a working path.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub addr: SocketAddr,
    blackholed: Arc<AtomicBool>,
    /// Bumped on restore: connections of an older epoch are closed.
    epoch: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<(u64, TcpStream)>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, c) in self.conns.lock().expect("conns").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, blackholed: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        if blackholed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let p = Proxy {
            addr,
            blackholed: Arc::default(),
            epoch: Arc::default(),
            conns: Arc::default(),
            stop: Arc::default(),
        };
        let (bh, stop, conns, epoch) = (p.blackholed.clone(), p.stop.clone(), p.conns.clone(), p.epoch.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let e = epoch.load(Ordering::SeqCst);
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    let mut list = conns.lock().expect("conns");
                    list.push((e, c2));
                    list.push((e, s2));
                }
                let (c1, s1) = (client.try_clone(), server.try_clone());
                if let (Ok(c1), Ok(s1)) = (c1, s1) {
                    let (bh1, st1) = (bh.clone(), stop.clone());
                    std::thread::spawn(move || pump(c1, s1, bh1, st1));
                    let (bh2, st2) = (bh.clone(), stop.clone());
                    std::thread::spawn(move || pump(server, client, bh2, st2));
                }
            }
        });
        Ok(p)
    }

    /// Stops every byte, keeping connections open.
    pub fn blackhole(&self) {
        self.blackholed.store(true, Ordering::SeqCst);
    }

    /// Heals the path: the stuck connections are closed, new ones work.
    pub fn restore(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut list = self.conns.lock().expect("conns");
        list.retain(|(e, c)| {
            if *e <= old {
                let _ = c.shutdown(Shutdown::Both);
                false
            } else {
                true
            }
        });
        drop(list);
        self.blackholed.store(false, Ordering::SeqCst);
    }
}
