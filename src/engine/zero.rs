//! Zero detection: splits data read from the source into runs of data and runs of
//! whole zero blocks, so that zeros cross the wire as zero requests instead of
//! payload. Pure and allocation-free; the executor decides what to send.

/// Granularity of zero detection (bytes).
pub const BLOCK: usize = 4096;

/// A run of `buf[start..end]` that is either all zeros or contains data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub end: usize,
    pub zero: bool,
}

/// True when every byte of `block` is zero. Reads 64 bytes a step with wide ORs,
/// which the compiler turns into vector instructions.
pub fn is_zero(block: &[u8]) -> bool {
    let mut chunks = block.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Calls `f` with the maximal runs of `buf`, in order, judging zero-ness per
/// `block` bytes (at least [`BLOCK`]; larger when a server needs whole blocks of
/// its own size; the last block may be shorter).
pub fn runs(buf: &[u8], block: usize, mut f: impl FnMut(Run)) {
    let mut cur: Option<Run> = None;
    let mut start = 0;
    for block in buf.chunks(block.max(BLOCK)) {
        let end = start + block.len();
        let zero = is_zero(block);
        cur = match cur {
            Some(mut r) if r.zero == zero => {
                r.end = end;
                Some(r)
            }
            Some(r) => {
                f(r);
                Some(Run { start, end, zero })
            }
            None => Some(Run { start, end, zero }),
        };
        start = end;
    }
    if let Some(r) = cur {
        f(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(buf: &[u8]) -> Vec<(usize, usize, bool)> {
        let mut v = Vec::new();
        runs(buf, BLOCK, |r| v.push((r.start, r.end, r.zero)));
        v
    }

    #[test]
    fn detects_zero_blocks() {
        assert!(is_zero(&[0; 4096]));
        assert!(is_zero(&[]));
        for pos in [0, 7, 63, 64, 4000, 4095] {
            let mut b = vec![0u8; 4096];
            b[pos] = 1;
            assert!(!is_zero(&b), "byte {pos}");
        }
        assert!(!is_zero(&[0, 0, 0, 1, 0]));
    }

    #[test]
    fn splits_into_runs_per_block() {
        let mut buf = vec![0u8; 5 * BLOCK + 100];
        buf[BLOCK + 5] = 9; // block 1 data
        buf[2 * BLOCK] = 9; // block 2 data
        buf[5 * BLOCK + 99] = 9; // short tail data
        assert_eq!(
            collect(&buf),
            vec![
                (0, BLOCK, true),
                (BLOCK, 3 * BLOCK, false),
                (3 * BLOCK, 5 * BLOCK, true),
                (5 * BLOCK, 5 * BLOCK + 100, false)
            ]
        );
    }

    #[test]
    fn larger_blocks_are_judged_whole() {
        let mut buf = vec![0u8; 4 * BLOCK];
        buf[BLOCK] = 1;
        let mut v = Vec::new();
        runs(&buf, 2 * BLOCK, |r| v.push((r.start, r.end, r.zero)));
        assert_eq!(v, vec![(0, 2 * BLOCK, false), (2 * BLOCK, 4 * BLOCK, true)]);
    }

    #[test]
    fn a_block_with_one_byte_is_data() {
        let mut buf = vec![0u8; 2 * BLOCK];
        buf[BLOCK - 1] = 1;
        assert_eq!(collect(&buf), vec![(0, BLOCK, false), (BLOCK, 2 * BLOCK, true)]);
        assert_eq!(collect(&[]), vec![]);
        assert_eq!(collect(&[0u8; 10]), vec![(0, 10, true)]);
    }
}
