//! Where kept digests cut a table into buckets: at keys chosen by their
//! content, not by counting rows, so the server and a replica holding the
//! same keys cut at the same keys without telling each other. A repair's
//! first round can then answer a replica's part from digests the server
//! kept, as long as the part's bounds are bounds of the server's buckets.
//!
//! A key starts a bucket when the 64-bit XXH3 of its [`key_bytes`] is a
//! multiple of [`BUCKET_MODULUS`]: one key in 128, so buckets hold about
//! 128 rows (geometrically spread: one in about 3,000 holds over 1,000).
//! Not 256: a changed row falls in a bucket twice the mean size on
//! average (a large bucket catches more changes), and every row of the
//! buckets that differ is read again on both sides in the next round; 128
//! keeps that at about 256 rows, as count-cut buckets of 256 did, for
//! twice the first round's digests (8 bytes per 128 rows).
//!
//! A second, finer level cuts buckets into sub-buckets the same way: a
//! key starts one when its hash is a multiple of [`SUB_BUCKET_MODULUS`]
//! (one key in 16; every key that starts a bucket starts a sub-bucket,
//! as 128 is a multiple of 16). A repair's second round cuts a differing
//! bucket at them, and the server answers those parts from the
//! sub-bucket sums it keeps instead of reading the bucket's rows again.
//! Every client (Rust, browser) must encode keys exactly as here; the
//! vector in the tests pins it.

use xxhash_rust::xxh3::xxh3_64;

use super::{Key, KeyValue};

/// One key in this many starts a bucket.
pub const BUCKET_MODULUS: u64 = 128;

/// One key in this many starts a sub-bucket (a divisor of
/// [`BUCKET_MODULUS`], so a bucket is made of whole sub-buckets).
pub const SUB_BUCKET_MODULUS: u64 = 16;

const _: () = assert!(BUCKET_MODULUS.is_multiple_of(SUB_BUCKET_MODULUS));

/// The bytes a key is hashed over: per value, in key order, a tag byte
/// and the value: `0x01` and the integer as 8 bytes big-endian (two's
/// complement), or `0x02`, the UTF-8 length as 8 bytes big-endian and the
/// UTF-8 bytes (uuids as their lowercase text, as keys hold them).
pub fn key_bytes(key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() * 16);
    for value in key {
        match value {
            KeyValue::Int(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_be_bytes());
            }
            KeyValue::Text(t) => {
                out.push(2);
                out.extend_from_slice(&(t.len() as u64).to_be_bytes());
                out.extend_from_slice(t.as_bytes());
            }
        }
    }
    out
}

/// Whether `key` starts a bucket (see the module's doc).
pub fn starts_bucket(key: &Key) -> bool {
    xxh3_64(&key_bytes(key)).is_multiple_of(BUCKET_MODULUS)
}

/// Whether `key` starts a sub-bucket (see the module's doc); true of
/// every key that starts a bucket.
pub fn starts_sub_bucket(key: &Key) -> bool {
    xxh3_64(&key_bytes(key)).is_multiple_of(SUB_BUCKET_MODULUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(i: i64) -> Key {
        vec![KeyValue::Int(i)]
    }

    /// Pinned: any client that cuts buckets must agree on these.
    #[test]
    fn bucket_starts_are_stable() {
        assert_eq!(
            key_bytes(&vec![KeyValue::Int(-2), KeyValue::Text("é".to_owned())]),
            [1, 255, 255, 255, 255, 255, 255, 255, 254, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0xc3, 0xa9]
        );
        let ints: Vec<i64> = (0..5_000).filter(|&i| starts_bucket(&int(i))).collect();
        assert_eq!(&ints[..8], STARTING_INTS);
        let texts: Vec<usize> = (0..5_000)
            .filter(|i| starts_bucket(&vec![KeyValue::Text(format!("key-{i}"))]))
            .collect();
        assert_eq!(&texts[..4], STARTING_TEXTS);
        assert_eq!(
            xxh3_64(&key_bytes(&int(1))),
            INT_ONE_HASH,
            "XXH3-64 of the integer key 1"
        );
    }

    /// Pinned: any client that cuts sub-buckets must agree on these; a
    /// key that starts a bucket starts a sub-bucket.
    #[test]
    fn sub_bucket_starts_are_stable() {
        let ints: Vec<i64> = (0..5_000).filter(|&i| starts_sub_bucket(&int(i))).collect();
        assert_eq!(&ints[..8], STARTING_SUB_INTS);
        let texts: Vec<usize> = (0..5_000)
            .filter(|i| starts_sub_bucket(&vec![KeyValue::Text(format!("key-{i}"))]))
            .collect();
        assert_eq!(&texts[..4], STARTING_SUB_TEXTS);
        for i in (0..5_000).filter(|&i| starts_bucket(&int(i))) {
            assert!(
                starts_sub_bucket(&int(i)),
                "{i} starts a bucket, not a sub-bucket"
            );
        }
        let subs = (0..256_000).filter(|&i| starts_sub_bucket(&int(i))).count();
        assert!((15_000..17_000).contains(&subs), "{subs}");
    }

    /// About one key in 128 starts a bucket, whatever the keys look like.
    #[test]
    fn about_one_key_in_128_starts_a_bucket() {
        let ints = (0..256_000).filter(|&i| starts_bucket(&int(i))).count();
        assert!((1_800..2_200).contains(&ints), "{ints}");
        let pairs = (0..256_000)
            .filter(|&i| starts_bucket(&vec![KeyValue::Int(i % 7), KeyValue::Text(i.to_string())]))
            .count();
        assert!((1_800..2_200).contains(&pairs), "{pairs}");
    }

    const STARTING_INTS: &[i64] = &[0, 149, 378, 515, 702, 1011, 1047, 1088];
    const STARTING_TEXTS: &[usize] = &[143, 225, 303, 473];
    const STARTING_SUB_INTS: &[i64] = &[0, 4, 73, 79, 85, 87, 89, 96];
    const STARTING_SUB_TEXTS: &[usize] = &[17, 40, 81, 97];
    const INT_ONE_HASH: u64 = 10_971_357_638_593_500_668;
}
