use super::encode::encoders_kept;

#[test]
fn the_encoder_keeps_every_block_in_flight_within_its_memory() {
    // Default 4 MiB blocks: a window of 4 and 2 ahead.
    assert_eq!(encoders_kept(6, 4 << 20), 6);
    // 8 MiB blocks: 2 + 2 in flight, but 64 MiB holds 4 encoders.
    assert_eq!(encoders_kept(4, 8 << 20), 4);
    // 16 MiB: 1 + 2 in flight, memory for 2.
    assert_eq!(encoders_kept(3, 16 << 20), 2);
    // 1 MiB: 16 + 2 in flight, all fit.
    assert_eq!(encoders_kept(18, 1 << 20), 18);
    // Huge blocks still keep two.
    assert_eq!(encoders_kept(3, 1 << 30), 2);
}
