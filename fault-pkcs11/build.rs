//! Links the module with `-z nodelete`: the dynamic loader never unloads it, as many
//! vendor modules are never unloaded. A consumer that drops and loads it again gets the
//! same instance, with its state (open sessions, faults already injected), which is what
//! the agent meets with such modules after a recovery.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
