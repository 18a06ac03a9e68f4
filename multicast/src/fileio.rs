//! Positional file reads and writes, per platform.

use std::fs::File;
use std::io;
use std::thread;

use sha2::{Digest as _, Sha256};

use crate::codec::{Layout, sha256};
use crate::wire::Digest;

/// Reads exactly `buf.len()` bytes at `offset`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
    #[cfg(not(any(unix, windows)))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

/// The most one write call hands the kernel. A decoded block is written in
/// pieces of this size rather than in one call. Given 4 MiB at once, Linux
/// may fill the page cache with large folios, and in this project's VM the
/// copy into those ran about 4x slower than into small ones (most likely
/// the host faulting in memory the guest had freed). Writing 64 MiB in
/// 4 MiB calls took 117-131 ms of CPU, in 256 KiB pieces 31-32 ms (a
/// Python pwrite test after 6 s idle, two rounds); in the 8-receiver lab
/// the receivers' copy into the page cache (`copy_folio_from_iter_atomic`)
/// was 10% of all CPU samples with 4 MiB blocks and under 1% with 2 MiB
/// ones (`perf record -a`). The price is 16 calls for a 4 MiB block.
const WRITE_PIECE: usize = 256 << 10;

/// Writes all of `buf` at `offset`, in pieces of at most 256 KiB (see
/// `WRITE_PIECE`).
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut at = offset;
    for piece in buf.chunks(WRITE_PIECE) {
        write_piece_at(file, piece, at)?;
        at += piece.len() as u64;
    }
    Ok(())
}

fn write_piece_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_write(
                file,
                &buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }
    #[cfg(not(any(unix, windows)))]
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(buf)
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk, without
/// waiting. Called after each decoded block is written, so that the file's
/// `sync_all` at the end finds little left to write: one block, not the
/// file. In the 8-receiver lab the eight final syncs of 64 MiB each held up
/// the sender's exit by 23-117 ms (the journal commit waits for their data),
/// and on an endpoint's slow disk a large package would wait seconds for it.
/// A hint only: where it is not available, or when it fails, the final sync
/// does the work and reports any error.
pub fn start_writeback(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor is open for the borrow of `file`; the call
        // reads no memory of ours.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
    }
}

/// Hashes every block and the whole file, in two threads (the second reads
/// the file again, from the page cache): for manifests and caches, and for
/// a send that ended before its encoder had read the whole file.
pub fn hash_file(file: &File, layout: &Layout) -> io::Result<(Vec<Digest>, Digest)> {
    // Side by side: 64 MiB in 72 ms in the bench lab.
    thread::scope(|scope| {
        let whole = scope.spawn(|| -> io::Result<Digest> {
            let mut whole = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0;
            while offset < layout.file_size() {
                let len = (layout.file_size() - offset).min(buf.len() as u64) as usize;
                read_exact_at(file, &mut buf[..len], offset)?;
                whole.update(&buf[..len]);
                offset += len as u64;
            }
            Ok(whole.finalize().into())
        });
        let mut blocks = Vec::with_capacity(layout.block_count() as usize);
        let mut buf = vec![0u8; layout.block_size() as usize];
        for b in 0..layout.block_count() {
            let len = layout.block_len(b);
            read_exact_at(file, &mut buf[..len], layout.offset(b))?;
            blocks.push(sha256(&buf[..len]));
        }
        let whole = whole
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        Ok((blocks, whole))
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A new empty file in the temporary directory, open to read and write.
    fn scratch(name: &str) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!("somcast-{name}-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn a_write_of_many_pieces_lands_whole_at_its_offset() {
        let (path, file) = scratch("fileio");
        // Three whole pieces and a short one, at an offset no piece aligns to.
        let data: Vec<u8> = (0..3 * WRITE_PIECE + 1001)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let offset = 4097;
        write_all_at(&file, &data, offset).unwrap();
        assert_eq!(file.metadata().unwrap().len(), offset + data.len() as u64);
        let mut back = vec![0u8; data.len()];
        read_exact_at(&file, &mut back, offset).unwrap();
        let mut head = vec![1u8; offset as usize];
        read_exact_at(&file, &mut head, 0).unwrap();
        drop(file);
        let _ = std::fs::remove_file(&path);
        assert!(back == data, "the data read back differs");
        assert!(
            head.iter().all(|&b| b == 0),
            "bytes before the offset were written"
        );
    }

    #[test]
    fn the_writeback_hint_leaves_the_file_as_written() {
        let (path, file) = scratch("wb");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        write_all_at(&file, &data, 0).unwrap();
        start_writeback(&file, 0, data.len());
        // Ranges past the end, and past what the system call takes, are a
        // no-op rather than an error.
        start_writeback(&file, 1 << 40, 4096);
        start_writeback(&file, u64::MAX, usize::MAX);
        file.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        read_exact_at(&file, &mut back, 0).unwrap();
        let len = file.metadata().unwrap().len();
        drop(file);
        let _ = std::fs::remove_file(&path);
        assert_eq!(len, data.len() as u64, "the hint changed the file's length");
        assert!(back == data, "the data read back differs");
    }
}
