fn main() -> std::process::ExitCode {
    dovegate::cli::main()
}
