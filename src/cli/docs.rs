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
    out.push_str(
        ".SH SYNOPSIS\n/etc/dovegate/dovegate.toml\n.br\n/etc/dovegate/dovegate.d/*.toml\n",
    );
    out.push_str(".SH DESCRIPTION\nA TOML file. Keys left out take the values shown below (the embedded default, printed by \\fBdovegate config \\-\\-default\\fR, and installed as /usr/share/doc/dovegate/dovegate.toml). Unknown keys are errors; \\fBdovegate check\\-config\\fR names the file, line and key at fault and exits 2. SIGHUP makes a running daemon reload the files; a bad one is refused and the running configuration stays.\n.PP\nAfter the file, the drop-ins in the directory beside it named like it with \\fB.d\\fR (\\fB/etc/dovegate/dovegate.d/\\fR) are read: every \\fB*.toml\\fR not starting with a dot, in the byte order of their names. A key a later file sets overrides the same key of an earlier one, key by key; a list is one value. The package's /etc/dovegate/dovegate.toml sets nothing and is never changed by an upgrade: put local settings there or in a drop-in. \\fBdovegate config\\fR prints the configuration in force.\n");
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
const MAIN_PAGE_EXTRA: &str = r#".SH HOW LOGINS REACH IT
Each source may run beside the others; a login seen twice is one grant. The README (\fB/usr/share/doc/dovegate/README.md\fR) has the set-up of each.
.TP
\fBjournal mode\fR (\fBsource.journal\fR; \fB"auto"\fR, the default, where journald runs)
Follows the systemd journal through \fBjournalctl\fR. An entry grants only when journald's own \fB_SYSTEMD_UNIT\fR is in \fBsource.journal_units\fR, so no local user can forge a login. Recommended; on Debian 12 without rsyslog Dovecot logs only there.
.TP
\fBfile mode\fR (\fBsource.logs\fR)
Follows log files across every logrotate method. Any local user can write a syslog line that looks like Dovecot's (\fBcheck\-config\fR warns); the file must stay readable by user \fBdovegate\fR (group \fBadm\fR, \fBcreate 0640 root adm\fR). Dovecot's own \fBlog_path\fR file is recreated 0600 root by \fBdoveadm log reopen\fR: use the journal there.
.TP
\fBpost\-login hook\fR (\fB[push] socket\fR)
Dovecot's \fBscript\-login /usr/lib/dovegate/postlogin\fR hands over each login's address and user (see dovegate\-postlogin(8)). It reports logins, not session ends: to hold grants of IMAP IDLE sessions, add the logs, the journal or the events.
.TP
\fBauth policy\fR (\fB[push] auth_policy\fR)
Dovecot's \fBauth_policy_server_url\fR reports each successful authentication (optionally SMTP AUTH too).
.TP
\fBevents\fR (\fB[events]\fR)
Dovecot's event exporter reports logins and exact session ends.
.TP
\fBDRAC clients\fR (\fB[drac]\fR)
POP/IMAP servers with a DRAC patch or plugin call \fBdracauth()\fR as they did with \fBrpc.dracd\fR: dovegate serves ONC RPC program 900101 over UDP and TCP, registered with the host's rpcbind, and grants the address each client in \fBdrac.allow\fR adds.
.SH SESSIONS
An open IMAP session keeps its address's grant while something shows it open (its imap process, \fBdoveadm who\fR, end lines, events), re\-checked every \fBgrant.session_recheck\fR and at most \fBgrant.session_hold\fR after its login. \fBdovegate sessions\fR lists them; \fBdovegate sessions drop\fR \fIID\fR stops one renewing; \fBdoveadm kick\fR \fIUSER\fR ends a session (a stolen password relays while its thief holds a session).
.SH MIGRATION
From pop\-before\-smtp and the like: run \fBdovegate run \-\-dry\-run\fR beside the old daemon (it prints what it would grant and expire, writing nothing), then replace Postfix's \fBcheck_client_access\fR table with \fBlmdb:/var/lib/dovegate/relay\fR and stop the old daemon. The README maps each old setting to its key.
.SH AUDIT TRAIL
\fBjournalctl \-u dovegate\fR shows one line per grant, expiry, manual grant and revoke, e.g. \fBgrant 203.0.113.10 user=alice imap until\fR \fITIME\fR; the fields \fBDOVEGATE_ADDRESS\fR, \fBDOVEGATE_USER\fR, ... filter them (\fBjournalctl \-u dovegate DOVEGATE_USER=alice\fR).
.SH FILES
.TP
\fB/etc/dovegate/dovegate.toml\fR
The configuration every command reads when it exists (see dovegate.toml(5)); \fB\-\-config\fR, else \fBDOVEGATE_CONFIG\fR, names another; with none of them, the embedded default applies (\fBdovegate config \-\-default\fR). \fBdovegate config\fR prints the configuration in force.
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
Reload the configuration (\fBsystemctl reload dovegate\fR), restarting the push, [serve] and [policy] servers whose settings changed; a bad one is refused and the running one stays.
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
dovegate.toml(5), postconf(5), access(5), lmdb_table(5), dovecot(1), journalctl(1), and the README: /usr/share/doc/dovegate/README.md
"#;

/// dovegate-help(8): clap's own `help` command, which dovegate(8) lists like the others.
fn help_command() -> clap::Command {
    clap::Command::new("dovegate-help")
        .about("Print the help of dovegate, or of one of its commands (as COMMAND --help does)")
        .arg(
            clap::Arg::new("command")
                .value_name("COMMAND")
                .help("The command whose help to print (none: dovegate's own)"),
        )
}

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
    render(
        help_command()
            .display_name("dovegate-help")
            .bin_name("dovegate help"),
        "dovegate-help.8".into(),
        ".SH SEE ALSO\ndovegate(8)\n",
    )?;
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

    /// (command, option long name, help text) of every visible option.
    fn option_help() -> Vec<(String, String, String)> {
        let mut cmd = Cli::command();
        cmd.build();
        let mut out = Vec::new();
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            for a in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let (Some(long), Some(help)) = (a.get_long(), a.get_help()) else {
                    continue;
                };
                out.push((sub.get_name().into(), long.into(), help.to_string()));
            }
        }
        out
    }

    /// Issue 26: each option's text is its own command's. `--config` states the real
    /// default (config::config_file); `test`'s journal options (read once) are not `run`'s
    /// (follow); an option two commands share word for word is one whose behaviour is the
    /// same in both (listed here, so that a copied text is a decision).
    #[test]
    fn option_help_belongs_to_its_command() {
        let all = option_help();
        let help = |cmd: &str, long: &str| {
            all.iter()
                .find(|(c, l, _)| c == cmd && l == long)
                .map(|(_, _, h)| h.clone())
                .unwrap_or_else(|| panic!("dovegate {cmd} --{long}"))
        };
        for (c, l, h) in &all {
            if l == "config" {
                assert!(
                    h.contains(crate::config::SYSTEM_CONFIG)
                        && h.contains(crate::config::CONFIG_ENV)
                        && !h.starts_with("Configuration file (default: the embedded"),
                    "dovegate {c} --config: {h}"
                );
            }
        }
        for long in ["journal", "journal-dir", "journal-file"] {
            assert_ne!(help("run", long), help("test", long), "--{long}");
        }
        assert!(help("run", "journal").contains("Follow"));
        assert!(!help("test", "journal").contains("Follow"));
        const SAME_EVERYWHERE: &[&str] = &["help", "config", "map", "json", "state-dir", "user"];
        for (i, (c1, l1, h1)) in all.iter().enumerate() {
            for (c2, l2, h2) in &all[i + 1..] {
                if c1 != c2 && l1 == l2 && h1 == h2 {
                    assert!(
                        SAME_EVERYWHERE.contains(&l1.as_str()),
                        "dovegate {c1} and {c2} share --{l1}'s text word for word: {h1}"
                    );
                }
            }
        }
    }

    /// Every page dovegate(8) lists is generated (dovegate-help(8) was missing), and the
    /// main page points to the README and says how logins reach dovegate.
    #[test]
    fn every_listed_page_exists() {
        let d = tempfile::tempdir().unwrap();
        generate(d.path()).unwrap();
        let main = std::fs::read_to_string(d.path().join("dovegate.8")).unwrap();
        let listed: Vec<&str> = main
            .lines()
            .filter_map(|l| l.strip_suffix("(8)"))
            .filter(|l| l.starts_with("dovegate\\-"))
            .collect();
        assert!(listed.len() > 10, "{listed:?}");
        for page in listed {
            let file = format!("{}.8", page.replace("\\-", "-"));
            assert!(
                d.path().join(&file).exists(),
                "{file} listed, not generated"
            );
        }
        for want in [
            "journal mode",
            "post\\-login hook",
            "auth policy",
            "SESSIONS",
            "MIGRATION",
            "README.md",
        ] {
            assert!(main.contains(want), "dovegate(8) lacks {want}");
        }
        let config = std::fs::read_to_string(d.path().join("dovegate-config.8")).unwrap();
        assert!(
            config.contains("\\-\\-config"),
            "dovegate config takes --config"
        );
    }
}
