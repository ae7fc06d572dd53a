//! `conduit-init`: the injected init container's one job, redirecting the pod's TCP through
//! its proxy (see the library's documentation for the rules). Exits 0 once they are in place;
//! `--dry-run` prints them instead.

use clap::Parser;

/// Redirect this network namespace's TCP through conduit-proxy (iptables, nat table).
#[derive(Debug, Parser)]
#[command(name = "conduit-init", version)]
struct Args {
    #[command(flatten)]
    redirect: conduit_init::Redirect,
    /// Print the iptables-restore input instead of applying it.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = if args.dry_run {
        args.redirect.validate().map(|()| {
            #[expect(clippy::print_stdout, reason = "--dry-run prints the rules")]
            {
                print!("{}", args.redirect.rules(""));
            }
        })
    } else {
        args.redirect.apply()
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            #[expect(
                clippy::print_stderr,
                reason = "the init container's log is its stderr"
            )]
            {
                eprintln!("conduit-init: {err:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
