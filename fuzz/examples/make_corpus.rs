//! Writes the seed corpora (`corpus/<target>/`) and prints which optional machine check each
//! machine seed trips on the code as built. Run from `fuzz/`:
//! `cargo run --release --example make_corpus`.

use std::collections::BTreeMap;
use std::panic;
use std::path::Path;

use tollgate_fuzz::machine::{self, Checks, checks::CHECKS};
use tollgate_fuzz::seeds;

fn write(dir: &Path, seeds: &[seeds::Seed]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}

/// Runs `input` with only `checks` on; the panic message if it failed.
fn trips(input: &[u8], checks: Checks) -> Option<String> {
    let (&me, program) = input.split_first()?;
    panic::catch_unwind(|| {
        let mut harness = machine::Harness::new(me, checks);
        for step in machine::steps::parse(program) {
            harness.execute(&step);
        }
    })
    .err()
    .map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// What a seed exercises: its steps, the messages it delivers, where the machine ends up.
fn summary(input: &[u8]) -> String {
    let Some((&me, program)) = input.split_first() else {
        return String::new();
    };
    let steps = machine::steps::parse(program);
    let mut raw: BTreeMap<String, usize> = BTreeMap::new();
    let mut harness = machine::Harness::new(me, Checks::default());
    for step in &steps {
        if let machine::Step::Raw { message, .. } = step {
            let name = format!("{message:?}");
            let variant = name
                .split([' ', '(', '{'])
                .next()
                .unwrap_or_default()
                .to_owned();
            *raw.entry(variant).or_default() += 1;
        }
        harness.execute(step);
    }
    let g = harness.gossip();
    format!(
        "{} steps, raw {raw:?}, reclaimed {}, {} usage / {} strict keys",
        steps.len(),
        g.strict().is_reclaimed(),
        g.eventual().table().key_count(),
        g.strict().key_count()
    )
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let (machine_seeds, mut messages) = seeds::machine();
    messages.extend(seeds::every_variant());
    let frame_seeds = seeds::frames(&messages);
    write(&root.join("gossip_machine"), &machine_seeds)?;
    write(&root.join("frame_decoder"), &frame_seeds)?;
    println!(
        "{} gossip_machine seeds, {} frame_decoder seeds",
        machine_seeds.len(),
        frame_seeds.len()
    );
    panic::set_hook(Box::new(|_| {}));
    for (name, bytes) in &machine_seeds {
        let mut tripped = Vec::new();
        for check in std::iter::once("none").chain(CHECKS) {
            let checks = Checks::parse(check).unwrap_or_default();
            if let Some(message) = trips(bytes, checks) {
                tripped.push(format!("{check}: {message}"));
            }
        }
        println!("{name} ({} bytes): {}", bytes.len(), summary(bytes));
        for t in tripped {
            println!("    trips {t}");
        }
    }
    Ok(())
}
