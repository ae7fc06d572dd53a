//! The `conduit` command.
//!
//! Nothing here yet beyond `--help` and `--version`: `demo`, `stat` and `check` arrive with the
//! controller issue (#4), `sim` with the simulation issue (#5).

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("--version" | "-V") => {
            #[expect(clippy::print_stdout, reason = "the command's output")]
            {
                println!("conduit {}", env!("CARGO_PKG_VERSION"));
            }
        }
        _ => {
            #[expect(clippy::print_stdout, reason = "the command's output")]
            {
                println!("conduit: the Conduit service mesh\n\nNo subcommands yet: `demo`, `stat` and `check` arrive with issue #4.");
            }
        }
    }
}
