//! Mutated signature files (flipped bytes, truncations, forged lengths) are refused with an
//! error naming the file; reading one never panics and never allocates beyond the file's size.

use anneal_data::dedup::{read_signatures, write_signatures, Shard};
use anneal_data::minhash::MinHashConfig;
use anneal_data::{Corpus, CorpusOptions};
use proptest::prelude::*;

fn signature_file() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        let text = format!("document {i} about rivers and towns and the weather in spring {i}");
        std::fs::write(src.join(format!("{i}.txt")), text).unwrap();
    }
    let corpus = Corpus::new(&[src], CorpusOptions::default()).unwrap();
    let config = MinHashConfig::new(0.8, 32, 3, 1);
    let one = Shard { index: 0, count: 1 };
    let (path, _) = write_signatures(&corpus, one, &config, &dir.path().join("sigs")).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (dir, path, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_files_are_refused_by_name(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (_dir, path, good) = signature_file();
        let mut bytes = good.clone();
        for (at, mask) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        std::fs::write(&path, &bytes).unwrap();
        match read_signatures(&path) {
            Ok(_) => prop_assert_eq!(&bytes, &good, "a damaged file was read"),
            Err(e) => prop_assert!(e.to_string().contains(&path.display().to_string()), "{}", e),
        }
    }
}
