fn main() -> std::process::ExitCode {
    imaged::cli::main()
}
