//! SIGHUP: the configuration is loaded again and applied section by section; a bad one is
//! refused and the running one stays. Applied: the sources (`[source]`, patterns), `[grant]`
//! (ttl, exclusions, sessions) but its ipv6_prefix, `map.commit_interval`, `[push]`,
//! `[events]`, `[drac]`, `[serve]` and `[policy]`. What needs a restart is named in one
//! WARN line each (`keep_restart_only`). The log level is `DOVEGATE_LOG`, not a setting.

use super::effective::{
    hold_secs, recheck_secs, serve_settings, session_probe, session_sources, Effective,
};
use super::pushed::pushed_settings;
use super::sources::Sources;
use super::{paths, status_line, Daemon};
use crate::config::Settings;
use crate::setup::Failure;
use crate::timefmt;

impl Daemon {
    /// Applies a reloaded configuration: the pushed servers whose settings changed, a new
    /// generation of sources (the old one's batches taken first), the `[serve]` and
    /// `[policy]` servers, and the engine's policy and session settings. An error is a
    /// generation of sources that could not start again: the daemon then shuts down.
    pub(super) fn reload(&mut self) -> Result<(), Failure> {
        crate::notify::reloading();
        match Effective::load(&self.args) {
            Ok(mut new) => {
                for line in keep_restart_only(&mut new.settings, &self.started) {
                    tracing::warn!("{line}");
                }
                let wanted = pushed_settings(&new.settings, self.dry.as_ref());
                let started = self.pushed.reload(&wanted).and_then(|()| {
                    for b in self.sources.stop_in_place() {
                        self.engine.accept(b, timefmt::now());
                    }
                    Sources::start(
                        &new,
                        &self.checkpoints,
                        &self.stats,
                        &self.deaths,
                        self.dry.as_ref(),
                        &mut self.pushed,
                    )
                });
                match started {
                    Ok(started) => {
                        self.sources = started;
                        if let Some(servers) = &mut self.servers {
                            self.runtime
                                .block_on(servers.reload(serve_settings(&new.settings)));
                        }
                        self.engine.set_policy(new.policy());
                        self.engine.set_session_hold(
                            hold_secs(&new.settings),
                            &session_sources(&new),
                            timefmt::now(),
                        );
                        self.engine.set_session_evidence(
                            session_probe(&new.settings),
                            recheck_secs(&new.settings),
                        );
                        self.cfg = new;
                        tracing::info!(logs = %paths(&self.cfg.settings.logs), ttl = %humantime::format_duration(self.cfg.settings.ttl), "configuration reloaded");
                    }
                    Err(f) => {
                        // A push socket another process serves, say: the pushed
                        // servers go back to the running configuration (a no-op
                        // when they did not move), the sources come back as they
                        // were (or never stopped), and only then is the refusal
                        // said (whoever acts on it finds them serving).
                        let running = pushed_settings(&self.cfg.settings, self.dry.as_ref());
                        if let Err(e) = self.pushed.reload(&running) {
                            tracing::error!("{}", e.message);
                        }
                        if self.sources.is_stopped() {
                            match Sources::start(
                                &self.cfg,
                                &self.checkpoints,
                                &self.stats,
                                &self.deaths,
                                self.dry.as_ref(),
                                &mut self.pushed,
                            ) {
                                Ok(s) => self.sources = s,
                                // Out through the shutdown below: what is pending
                                // is committed first.
                                Err(f2) => return Err(f2),
                            }
                        }
                        tracing::error!(
                            "reload refused, the running configuration stays: {}",
                            f.message
                        );
                    }
                }
            }
            Err(f) => tracing::error!(
                "reload refused, the running configuration stays: {}",
                f.message
            ),
        }
        crate::notify::ready(&status_line(&self.engine, &self.stats));
        Ok(())
    }
}

/// Puts back in `new` what only a restart can change, as it runs (`started`), and returns
/// one line for each such change. map.path and state.dir: the instance lock, the map and
/// the checkpoints are open. map.action and grant.ipv6_prefix: the open map writes its
/// values and keys with them, and the engine's grants are keyed by the prefix (a reload
/// taking the new prefix into the policy alone would key new grants unlike the old ones).
/// `[store]`: the database's writer and the shared policy exchange run with it.
fn keep_restart_only(new: &mut Settings, started: &Settings) -> Vec<&'static str> {
    let mut lines = Vec::new();
    if new.map_path != started.map_path || new.state_dir != started.state_dir {
        lines.push("map.path and state.dir changes take effect at the next restart");
        new.map_path = started.map_path.clone();
        new.state_dir = started.state_dir.clone();
    }
    if new.action != started.action {
        lines.push("map.action changes take effect at the next restart");
        new.action = started.action.clone();
    }
    if new.ipv6_prefix != started.ipv6_prefix {
        lines.push("grant.ipv6_prefix: the daemon keeps the running prefix until it is restarted (the map and its grants are keyed by it); restart it now: until then dovegate grant, revoke and lookup use the new prefix, and a grant or revoke by hand rewrites the map under it, dropping the daemon's IPv6 grants (as the restart does: those clients relay again at their next login)");
        new.ipv6_prefix = started.ipv6_prefix;
    }
    if new.store != started.store {
        lines.push("[store] changes take effect at the next restart");
        new.store = started.store.clone();
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn settings(text: &str) -> Settings {
        FileConfig::parse(text, "test.toml")
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn a_reload_names_each_setting_that_needs_a_restart_and_keeps_it() {
        let running = settings("[map]\naction = \"OK\"\n[grant]\nipv6_prefix = 128\n");
        let mut new = settings(
            "[map]\naction = \"RELAY\"\n[grant]\nipv6_prefix = 64\nttl = \"2h\"\n[store]\nspill_max_grants = 1000\n",
        );
        let lines = keep_restart_only(&mut new, &running);
        assert_eq!(
            lines,
            [
                "map.action changes take effect at the next restart",
                "grant.ipv6_prefix: the daemon keeps the running prefix until it is restarted (the map and its grants are keyed by it); restart it now: until then dovegate grant, revoke and lookup use the new prefix, and a grant or revoke by hand rewrites the map under it, dropping the daemon's IPv6 grants (as the restart does: those clients relay again at their next login)",
                "[store] changes take effect at the next restart",
            ]
        );
        assert_eq!(new.action, running.action);
        assert_eq!(new.ipv6_prefix, 128);
        assert_eq!(new.store, running.store);
        // What a reload applies is left as loaded.
        assert_eq!(new.ttl, std::time::Duration::from_secs(7200));
        // Unchanged: nothing said.
        let mut same = running.clone();
        assert!(keep_restart_only(&mut same, &running).is_empty());
    }
}
