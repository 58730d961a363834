//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the same
//! function its cargo-fuzz target calls (`tollgate::fuzzing`), so inputs that once broke
//! something stay fixed, without a fuzzer in CI.

use std::path::Path;

#[test]
fn every_fuzz_corpus_file_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, run) in tollgate::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name}: no corpus files");
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", f.display());
        }
    }
}
