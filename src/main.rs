fn main() {
    std::process::exit(marlin::cli::main());
}
