//! Disk images with a bit of everything, and the random numbers that draw them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// xorshift64*: small, seedable, good enough for moments and contents.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A sparse file of `size` bytes made of 256 KiB pieces: holes (never written),
/// data (random bytes, some with a zero run inside), and written zeros.
pub fn write_image(path: &Path, size: u64, rng: &mut Rng) {
    const PIECE: u64 = 256 << 10;
    let f = File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; PIECE as usize];
    let mut at = 0;
    while at < size {
        let n = PIECE.min(size - at);
        let piece = &mut buf[..n as usize];
        match rng.below(10) {
            0..=3 => {} // a hole
            4 | 5 => {
                piece.fill(0);
                f.write_all_at(piece, at).unwrap();
            }
            _ => {
                for chunk in piece.chunks_mut(8) {
                    let v = rng.next().to_le_bytes();
                    chunk.copy_from_slice(&v[..chunk.len()]);
                }
                if rng.below(3) == 0 {
                    // A zero run inside data, not aligned to anything in particular.
                    let start = rng.below(n / 2) as usize;
                    let len = rng.below(n / 2) as usize;
                    piece[start..start + len].fill(0);
                }
                f.write_all_at(piece, at).unwrap();
            }
        }
        at += n;
    }
    f.sync_all().unwrap();
}
