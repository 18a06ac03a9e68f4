//! `somcast serve`: only regular files under its root (symlinks and
//! FIFOs: Unix).
#![cfg(unix)]

mod common;

use common::{TempDir, get, origin_dir, start_origin};

#[test]
fn serve_keeps_to_regular_files_under_its_root() {
    use std::io::{Read, Write};
    let dir = TempDir::new("serve");
    let root = origin_dir(&dir);
    std::fs::write(root.join("pkg.bin"), b"package").unwrap();
    std::fs::write(dir.0.join("secret"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(dir.0.join("secret"), root.join("out")).unwrap();
    std::os::unix::fs::symlink(root.join("pkg.bin"), root.join("in")).unwrap();
    let fifo = root.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let origin = start_origin(&root, "0");
    assert_eq!(get(origin.addr, "/pkg.bin", None), (200, "package".into()));
    assert_eq!(
        get(origin.addr, "/in", None).1,
        "package",
        "a link within the root"
    );
    let (code, body) = get(origin.addr, "/out", None);
    assert_eq!(code, 404, "a link out of the root: {body}");
    // A FIFO is refused at once; opening it would wait for a writer.
    let mut s = std::net::TcpStream::connect(origin.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /fifo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(
        text.starts_with("HTTP/1.1 404"),
        "no answer within 5 s: {text:?}"
    );
}
