//! A small file and its layout for the unit tests: ten blocks of ten
//! 64-byte symbols, and a short last block.

use multicast::codec::Layout;

/// Symbol size of [`setup`]'s layout.
pub const T: u16 = 64;

pub fn setup() -> (Layout, Vec<u8>) {
    let layout = Layout::for_file(10 * 640 + 100, 640, T).unwrap();
    let file = (0..layout.file_size())
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    (layout, file)
}

/// Block `b`'s bytes.
pub fn block_of(layout: &Layout, file: &[u8], b: u32) -> Vec<u8> {
    let at = layout.offset(b) as usize;
    file[at..at + layout.block_len(b)].to_vec()
}
