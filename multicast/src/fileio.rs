//! Positional file reads and writes, per platform.

use std::fs::File;
use std::io;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_of_many_pieces_lands_whole_at_its_offset() {
        let path = std::env::temp_dir().join(format!("somcast-fileio-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
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
}
