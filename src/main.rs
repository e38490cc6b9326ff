/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc returns large ones to the
/// kernel and page-faults them back in (about a fifth of a CPU forward pass; BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that never panics: when stdout is closed (`marlin info w.pt | head -1`) the line
/// is dropped and the work goes on.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that never panics (see `outln!`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

mod cli;

fn main() {
    std::process::exit(cli::main());
}
