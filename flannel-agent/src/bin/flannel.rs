fn main() {
    std::process::exit(flannel_agent::cni::main());
}
