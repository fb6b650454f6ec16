use std::path::PathBuf;
use std::process::ExitCode;

use cilium_operator::config::{self, Config, LogFormat, RawConfig};

fn main() -> ExitCode {
    let matches = config::command().get_matches();
    if let Some(("crdgen", sub)) = matches.subcommand() {
        let dir = PathBuf::from(sub.get_one::<String>("output-dir").expect("has a default"));
        return match cilium_operator::crds::generate(&dir) {
            Ok(paths) => {
                for p in paths {
                    println!("wrote {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: crdgen: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match RawConfig::from_matches(&matches).and_then(|raw| Config::from_raw(&raw)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match runtime.block_on(cilium_operator::run::run(cfg)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "operator failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config) {
    let default = if cfg.debug { "debug,hyper=info,rustls=info,tower=info" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CILIUM_LOG_FILTER")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match cfg.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
