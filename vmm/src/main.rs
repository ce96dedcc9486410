//! minivmm: `main` → parse the CLI → build the VM → load the kernel → run vCPUs → event loop.

mod api;
mod boot;
mod cli;
mod devices_setup;
mod event_loop;
mod exit;
mod layout;
mod machine;
mod migrate;
mod vstate;

use clap::Parser;

use cli::{Cli, Command};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One readable line, like every other minivmm error.
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
                .collect();
            eprintln!("minivmm: {}", lines.join(" ").trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    let result: Result<i32, Box<dyn std::error::Error>> = match cli.command {
        Command::Run(args) => machine::run(&args).map_err(Into::into),
        Command::Receive(args) => machine::receive(&args).map_err(Into::into),
        Command::Migrate {
            api_sock,
            to: Some(to),
            tuning,
            ..
        } => api::migrate_client(&api_sock, &to, &tuning).map_err(Into::into),
        Command::Migrate { api_sock, .. } => {
            api::client(&api_sock, "migrate-cancel", &[]).map_err(Into::into)
        }
        Command::Ctl {
            api_sock,
            cmd,
            args,
        } => api::client(&api_sock, &cmd, &args).map_err(Into::into),
        Command::Certs {
            dir,
            hosts,
            expired,
            ca,
        } => {
            let spec = migration::certs::CertsSpec {
                hosts: &hosts,
                expired,
                ca: ca.as_deref(),
            };
            migration::certs::write_test_certs(&dir, &spec)
                .map(|()| {
                    println!(
                        "wrote {0}/ca.pem, {0}/source/ and {0}/destination/ (--tls-dir)",
                        dir.display()
                    );
                    0
                })
                .map_err(Into::into)
        }
        Command::Guests { extract } => guests::all()
            .iter()
            .try_for_each(|g| {
                println!("{:<10} {}", g.name, g.about);
                let Some(dir) = &extract else { return Ok(()) };
                std::fs::create_dir_all(dir)?;
                std::fs::write(dir.join(format!("{}.elf", g.name)), g.elf)
            })
            .map(|()| 0)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("minivmm: error: {e}");
            std::process::exit(1);
        }
    }
}
