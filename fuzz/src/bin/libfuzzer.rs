//! libFuzzer driver: `SHADOWBACK_FUZZ_TARGET=<target>` picks the target
//! (`scripts/fuzz.sh` sets it; docs/FUZZING.md). Built on stable Rust with
//! the sanitizer-coverage pass and `--features libfuzzer`.

#![no_main]

use std::sync::OnceLock;

use shadowback_fuzz::Target;

fn target() -> Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    *TARGET.get_or_init(|| {
        let name = std::env::var("SHADOWBACK_FUZZ_TARGET").unwrap_or_default();
        Target::from_name(&name).unwrap_or_else(|| {
            let names: Vec<_> = Target::ALL.iter().map(|t| t.name()).collect();
            eprintln!("SHADOWBACK_FUZZ_TARGET must be one of {names:?}, not {name:?}");
            std::process::exit(2);
        })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| target().run(data));
