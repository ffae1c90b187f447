//! `aiq-braze-sync-packaging OUT_DIR`: writes what the Debian package ships besides the
//! binary, for `[package.metadata.deb]` in the root Cargo.toml to pick up (packaging/test-deb.sh
//! and README.md's "Install" use `target/package`):
//!
//! - `man/*.1`: aiq-braze-sync(1) and a page per subcommand, from the clap definitions;
//! - `completions/`: bash, zsh and fish, from the same definitions;
//! - `aiq-braze-sync.service`: `systemd/aiq-braze-sync.service` with `ExecStart=` at
//!   `/usr/bin` (the repository's unit keeps `/usr/local/bin`, for a build from source);
//! - `config.toml`: `data/config.example.toml` with `braze.endpoint` commented out, for the
//!   operator to set, and a header saying what to do before the first start.
//!
//! Each edit of a repository file is checked: if the line it expects is gone, this fails
//! rather than ship a file that silently lost the edit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::{fs, io};

use aiq_braze_sync::cli::Cli;
use clap::CommandFactory;
use clap_complete::Shell;

const BIN: &str = "aiq-braze-sync";
const UNIT: &str = include_str!("../../systemd/aiq-braze-sync.service");
const EXAMPLE_CONFIG: &str = include_str!("../../data/config.example.toml");

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: aiq-braze-sync-packaging OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aiq-braze-sync-packaging: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every file into `out` (created if missing; earlier output replaced) and returns
/// their paths.
fn generate(out: &Path) -> io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        // A subcommand renamed since the last run must not leave its old page behind.
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir_all(dir)?;
    }
    let mut written = man_pages(&man)?;
    written.extend(shell_completions(&completions)?);
    for (name, text) in [
        ("aiq-braze-sync.service", packaged_unit()),
        ("config.toml", packaged_config()),
    ] {
        let path = out.join(name);
        fs::write(&path, text.map_err(io::Error::other)?)?;
        written.push(path);
    }
    Ok(written)
}

/// aiq-braze-sync(1), with FILES, ENVIRONMENT and SEE ALSO sections, and a page per
/// (sub)subcommand named as `man` looks them up: aiq-braze-sync-queue-stats(1).
fn man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    // As clap_mangen::generate_to: no page for the implicit `help` subcommand.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    man_page(&cmd, dir, MAIN_PAGE_EXTRA, &mut written)?;
    Ok(written)
}

fn man_page(
    cmd: &clap::Command,
    dir: &Path,
    extra: &str,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_page(sub, dir, SUBCOMMAND_PAGE_EXTRA, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone()).manual("aiq-braze-sync");
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(extra.as_bytes());
    let path = dir.join(man.get_filename());
    fs::write(&path, page)?;
    written.push(path);
    Ok(())
}

/// Appended to aiq-braze-sync(1) (roff).
const MAIN_PAGE_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/aiq\-braze\-sync/config.toml\fR
The configuration (the default of \fB\-\-config\fR). Set \fBbraze.endpoint\fR in it before the first start.
Every key, its default and its meaning: \fI/usr/share/doc/aiq\-braze\-sync/README.md\fR.
.TP
\fI/etc/aiq\-braze\-sync/braze\-api\-key\fR
The Braze REST API key (mode 0600, root's), named by \fBapi_key_file\fR in the configuration.
The service reads the copy systemd hands it as the credential \fIbraze\-api\-key\fR; run by hand, the command reads the file itself.
.TP
\fI/var/lib/aiq\-braze\-sync\fR
The queue (\fBdata_dir\fR): a link to \fI/var/lib/private/aiq\-braze\-sync\fR, the service's state directory.
Removing or purging the package leaves it in place (see README.md, "Install").
.TP
\fI/lib/systemd/system/aiq\-braze\-sync.service\fR
The systemd unit. Installing the package neither enables nor starts it: \fBsystemctl enable \-\-now aiq\-braze\-sync\fR.
.SH ENVIRONMENT
.TP
\fBBRAZE_REST_ENDPOINT\fR, \fBBRAZE_API_KEY\fR, \fBAIQ_SYNC_INGEST_TOKEN\fR
Override \fBbraze.endpoint\fR, the API key and the ingest token of the configuration.
.TP
\fBAIQ_SYNC_ACCEPT_LOSS\fR
As \fBrun \-\-accept\-loss\fR.
.SH EXIT STATUS
0 on success; 2 when the configuration is invalid. \fBcheck\fR and \fBreconcile\fR have more: see their pages.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fI/usr/share/doc/aiq\-braze\-sync/README.md\fR
"#;

/// Appended to every subcommand's page (roff).
const SUBCOMMAND_PAGE_EXTRA: &str = r#".SH SEE ALSO
\fBaiq\-braze\-sync\fR(1), \fI/usr/share/doc/aiq\-braze\-sync/README.md\fR
"#;

/// Completion scripts under the names each shell's Debian package looks them up by:
/// bash-completion loads `completions/aiq-braze-sync` on first use, zsh's vendor directory
/// wants `_aiq-braze-sync`, fish's `aiq-braze-sync.fish`.
fn shell_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (shell, name) in [
        (Shell::Bash, BIN.to_owned()),
        (Shell::Zsh, format!("_{BIN}")),
        (Shell::Fish, format!("{BIN}.fish")),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), BIN, &mut script);
        let path = dir.join(name);
        fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}

/// The repository's unit with the packaged binary's path, a man page for `Documentation=`,
/// and a note on where local changes go.
fn packaged_unit() -> Result<String, String> {
    let unit = replace_once(
        UNIT,
        "\nExecStart=/usr/local/bin/aiq-braze-sync ",
        "\nExecStart=/usr/bin/aiq-braze-sync ",
    )?;
    let unit = replace_once(
        &unit,
        "\nDocumentation=file:///usr/share/doc/aiq-braze-sync/README.md\n",
        "\nDocumentation=man:aiq-braze-sync(1) file:///usr/share/doc/aiq-braze-sync/README.md\n",
    )?;
    // The repository's header is about .ci/run's checks of that file; this one's reader
    // wants to know where a change goes.
    replace_once(
        &unit,
        "# aiq-braze-sync as a systemd service. Install notes: README.md, \"Run it under systemd\".\n\
         # .ci/run checks this file with `systemd-analyze verify` (no output allowed) and\n\
         # `systemd-analyze security --offline=yes` (exposure must stay at or under 2.0).\n",
        "# aiq-braze-sync as a systemd service, installed by its Debian package: an upgrade\n\
         # replaces this file. Change settings with `systemctl edit aiq-braze-sync` (a drop-in\n\
         # under /etc/systemd/system), then `systemctl restart aiq-braze-sync`.\n",
    )
}

/// The example configuration as the conffile `/etc/aiq-braze-sync/config.toml`: the endpoint
/// is the operator's to set (left commented out, a start fails with exit 2 naming it, and
/// systemd does not restart on 2), and the key goes in the file `api_key_file` names.
fn packaged_config() -> Result<String, String> {
    let config = replace_once(
        EXAMPLE_CONFIG,
        "# aiq-braze-sync example configuration. Every key below is optional unless marked required;\n\
         # the values shown are the defaults. See README.md for what each one means.\n",
        "# /etc/aiq-braze-sync/config.toml: aiq-braze-sync's configuration, installed by its Debian\n\
         # package; dpkg keeps your changes on upgrade. Every key below is optional unless marked\n\
         # required; the values shown are the defaults. What each one means:\n\
         # /usr/share/doc/aiq-braze-sync/README.md.\n\
         #\n\
         # Before `systemctl enable --now aiq-braze-sync`:\n\
         #   1. set braze.endpoint below to your instance's REST endpoint;\n\
         #   2. put the REST API key in /etc/aiq-braze-sync/braze-api-key, readable by root alone:\n\
         #        install -m 0600 /dev/null /etc/aiq-braze-sync/braze-api-key\n\
         #        cat > /etc/aiq-braze-sync/braze-api-key    # paste the key, Enter, Ctrl-D\n\
         #   3. prove the setup against Braze: aiq-braze-sync check\n",
    )?;
    let config = replace_once(
        &config,
        "\nendpoint = \"https://rest.iad-01.braze.com\"  # required; env BRAZE_REST_ENDPOINT overrides\n",
        "\n# endpoint = \"https://rest.iad-01.braze.com\"  # REQUIRED: uncomment, set your instance's; env BRAZE_REST_ENDPOINT overrides\n",
    )?;
    // The unit's StateDirectory=; kept as it is, but checked, since the service would
    // otherwise write where ProtectSystem=strict forbids it.
    replace_once(
        &config,
        "\ndata_dir = \"/var/lib/aiq-braze-sync\" ",
        "\ndata_dir = \"/var/lib/aiq-braze-sync\" ",
    )
}

/// `text` with its only occurrence of `from` replaced by `to`; an error when `from` occurs
/// no times or several.
fn replace_once(text: &str, from: &str, to: &str) -> Result<String, String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(format!(
            "expected one occurrence of {from:?}, found {n}: update packaging/src/main.rs"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aiq_braze_sync::config::Config;

    #[test]
    fn unit_runs_the_packaged_binary() {
        let unit = packaged_unit().unwrap();
        assert!(unit.contains(
            "\nExecStart=/usr/bin/aiq-braze-sync --config /etc/aiq-braze-sync/config.toml run\n"
        ));
        assert!(!unit.contains("/usr/local"));
        // Everything else is the checked unit, line for line.
        let lines = |s: &str| s.lines().filter(|l| !l.starts_with("#")).count();
        assert_eq!(lines(&unit), lines(UNIT));
    }

    #[test]
    fn config_needs_the_endpoint_and_nothing_else() {
        let config = packaged_config().unwrap();
        let etc = Path::new("/etc/aiq-braze-sync");
        let key = |name: &str| (name == "BRAZE_API_KEY").then(|| "k".repeat(36));
        let err = Config::from_toml_str(&config, etc, &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("braze.endpoint"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");

        let set = |name: &str| match name {
            "BRAZE_REST_ENDPOINT" => Some("https://rest.iad-01.braze.com".to_owned()),
            _ => key(name),
        };
        let c = Config::from_toml_str(&config, etc, &set).unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/aiq-braze-sync"));
    }

    /// cargo-deb versions the package `<Cargo version>-1`; Debian's changelog names the version
    /// it describes, so a release adds an entry to packaging/debian/changelog.
    #[test]
    fn changelog_describes_this_version() {
        let changelog = include_str!("../debian/changelog");
        let version = Cli::command().get_version().unwrap().to_owned();
        let first = changelog.lines().next().unwrap();
        assert!(
            first.starts_with(&format!("aiq-braze-sync ({version}-1) ")),
            "packaging/debian/changelog starts with {first:?}: add an entry for {version}-1"
        );
    }

    #[test]
    fn generates_every_file() {
        let out = tempfile::tempdir().unwrap();
        let files = generate(out.path()).unwrap();
        for name in [
            "man/aiq-braze-sync.1",
            "man/aiq-braze-sync-run.1",
            "man/aiq-braze-sync-queue-stats.1",
            "completions/aiq-braze-sync",
            "completions/_aiq-braze-sync",
            "completions/aiq-braze-sync.fish",
            "aiq-braze-sync.service",
            "config.toml",
        ] {
            assert!(files.contains(&out.path().join(name)), "{name}: {files:?}");
        }
        assert!(!out.path().join("man/aiq-braze-sync-help.1").exists());
        let main = fs::read_to_string(out.path().join("man/aiq-braze-sync.1")).unwrap();
        assert!(main.contains(".SH FILES"));
    }
}
