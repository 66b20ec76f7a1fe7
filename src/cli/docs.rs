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

pub fn generate(dir: &Path) -> Result<(), Failure> {
    let err = |e: std::io::Error| Failure::runtime(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(err)?;
    let cmd = Cli::command();
    let render = |cmd: clap::Command, file: String| -> Result<(), Failure> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .section("8")
            .render(&mut page)
            .map_err(err)?;
        std::fs::write(dir.join(file), page).map_err(err)
    };
    render(cmd.clone(), "dovegate.8".into())?;
    // One page per command, as git does: dovegate-run(8), dovegate-test(8), ...
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("dovegate-{}", sub.get_name());
        render(
            sub.clone().name(name.clone()).bin_name(name.clone()),
            format!("{name}.8"),
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
