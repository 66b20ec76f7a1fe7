//! Man pages and shell completions, generated from the clap definitions and the config
//! reference (the commented default configuration), so that they cannot drift from the
//! code. `dovegate generate-docs DIR` writes them; the Debian package build calls it.

use std::path::Path;

use clap::CommandFactory;

use super::{Cli, Failure};
use crate::config::DEFAULT_CONFIG;

fn roff_escape(s: &str) -> String {
    let s = s.replace('\\', "\\e");
    // A line starting with . or ' is a roff request.
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// dovegate.toml(5) from the commented default configuration.
pub fn config_man_page() -> String {
    let mut out = String::new();
    out.push_str(".TH DOVEGATE.TOML 5 \"\" \"dovegate\" \"File Formats\"\n");
    out.push_str(".SH NAME\ndovegate.toml \\- configuration of dovegate(8)\n");
    out.push_str(".SH SYNOPSIS\n/etc/dovegate/dovegate.toml\n");
    out.push_str(".SH DESCRIPTION\nA TOML file. Keys left out take the values shown below (the embedded default, printed by \\fBdovegate config \\-\\-default\\fR). Unknown keys are errors; \\fBdovegate check\\-config\\fR names the key at fault and exits 2. SIGHUP makes a running daemon reload the file; a bad file is refused and the running configuration stays.\n");
    let mut in_section = false;
    let mut comment = Vec::new();
    for line in DEFAULT_CONFIG.lines() {
        let t = line.trim();
        if let Some(section) = t.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
            out.push_str(&format!(".SH [{}]\n", roff_escape(section).to_uppercase()));
            in_section = true;
            comment.clear();
        } else if let Some(c) = t.strip_prefix('#') {
            comment.push(roff_escape(c.trim()));
        } else if !t.is_empty() && in_section {
            out.push_str(&format!(
                ".TP\n\\fB{}\\fR\n{}\n",
                roff_escape(t),
                comment.join("\n")
            ));
            comment.clear();
        }
    }
    out.push_str(".SH SEE ALSO\ndovegate(8), postconf(5), access(5)\n");
    out
}

/// The sections of dovegate(8) that no command-line definition holds.
const MAIN_PAGE_EXTRA: &str = r#".SH FILES
.TP
\fB/etc/dovegate/dovegate.toml\fR
The configuration every command reads when it exists (see dovegate.toml(5)); \fB\-\-config\fR or \fBDOVEGATE_CONFIG\fR name another; without any, the embedded default applies (\fBdovegate config \-\-default\fR).
.TP
\fB/var/lib/dovegate/relay.lmdb\fR
The relay map Postfix reads as \fBlmdb:/var/lib/dovegate/relay\fR: one key per granted client address, value \fBOK expires=\fR\fITIME\fR.
.TP
\fB/var/lib/dovegate/checkpoints/\fR
Where each followed log file and the journal were read up to; written only after the grants they cover are in the map.
.TP
\fB/run/dovegate/socketmap\fR
The socketmap socket, when \fBserve.socketmap\fR is set.
.TP
\fB/usr/share/dovegate/patterns/\fR
The pattern library as shipped, to copy and edit (\fBpatterns.dir\fR).
.SH EXIT STATUS
.TP
\fB0\fR
Success (\fBrun\fR: stopped by SIGTERM or SIGINT after committing what it had read).
.TP
\fB1\fR
Not found (\fBlookup\fR, \fBrevoke\fR) or a runtime failure (the map or a log cannot be used; the message names it).
.TP
\fB2\fR
Bad configuration or usage; the message names the file, line, column and key at fault.
.SH ENVIRONMENT
.TP
\fBDOVEGATE_CONFIG\fR
The configuration file, when \fB\-\-config\fR is not given.
.TP
\fBDOVEGATE_LOG\fR
Log filter, e.g. \fBdebug\fR or \fBdovegate=debug\fR (default \fBinfo\fR). Under systemd, logs go to the journal with native fields.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Commit the grants already read, write the checkpoints, exit 0.
.TP
\fBSIGHUP\fR
Reload the configuration (\fBsystemctl reload dovegate\fR), restarting the push and [serve] servers whose settings changed; a bad one is refused and the running one stays.
.SH EXAMPLES
Postfix main.cf:
.PP
.nf
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,
    check_client_access lmdb:/var/lib/dovegate/relay, reject_unauth_destination
.fi
.PP
Check the configuration as the service will see it, then start it:
.PP
.nf
dovegate check\-config
systemctl enable \-\-now dovegate
.fi
.PP
Try the patterns on a saved log, and list the grants:
.PP
.nf
dovegate test /var/log/mail.log.1
dovegate list
.fi
.SH SEE ALSO
dovegate.toml(5), postconf(5), access(5), lmdb_table(5), dovecot(1), journalctl(1)
"#;

pub fn generate(dir: &Path) -> Result<(), Failure> {
    let err = |e: std::io::Error| Failure::runtime(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(err)?;
    let cmd = Cli::command();
    let render = |cmd: clap::Command, file: String, extra: &str| -> Result<(), Failure> {
        let mut page = Vec::new();
        let man = clap_mangen::Man::new(cmd).section("8");
        man.render(&mut page).map_err(err)?;
        page.extend_from_slice(extra.as_bytes());
        std::fs::write(dir.join(file), page).map_err(err)
    };
    render(cmd.clone(), "dovegate.8".into(), MAIN_PAGE_EXTRA)?;
    // One page per command, as git does: dovegate-run(8), dovegate-test(8), ... Its
    // synopsis is the command as typed: `dovegate run ...`.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("dovegate-{}", sub.get_name());
        let typed = format!("dovegate {}", sub.get_name());
        render(
            sub.clone()
                .name(name.clone())
                .display_name(name.clone())
                .bin_name(typed),
            format!("{name}.8"),
            ".SH SEE ALSO\ndovegate(8), dovegate.toml(5)\n",
        )?;
    }
    std::fs::write(dir.join("dovegate.toml.5"), config_man_page()).map_err(err)?;
    let shells = [
        (clap_complete::Shell::Bash, "dovegate.bash"),
        (clap_complete::Shell::Zsh, "_dovegate"),
        (clap_complete::Shell::Fish, "dovegate.fish"),
    ];
    for (shell, file) in shells {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "dovegate", &mut out);
        std::fs::write(dir.join(file), out).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command has help text (the man pages describe each one).
    fn undocumented_arguments() -> Vec<String> {
        fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.is_hide_set() || a.get_help().is_some() || a.get_long_help().is_some() {
                    continue;
                }
                out.push(format!("{path} {}", a.get_id()));
            }
            for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(s, &format!("{path} {}", s.get_name()), out);
            }
        }
        let mut out = Vec::new();
        walk(&Cli::command(), "dovegate", &mut out);
        out
    }

    #[test]
    fn every_argument_is_described() {
        assert_eq!(undocumented_arguments(), Vec::<String>::new());
    }
}
