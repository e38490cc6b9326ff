/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc returns large ones to the
/// kernel and page-faults them back in (about a fifth of a CPU forward pass; BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(marlin::cli::main());
}
