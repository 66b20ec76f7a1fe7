//! SIGHUP: the configuration is loaded again and applied section by section; a bad one is
//! refused and the running one stays.

use super::effective::{
    hold_secs, recheck_secs, serve_settings, session_probe, session_sources, Effective,
};
use super::pushed::pushed_settings;
use super::sources::Sources;
use super::{paths, status_line, Daemon};
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
                if new.settings.map_path != self.started.map_path
                    || new.settings.state_dir != self.started.state_dir
                {
                    tracing::warn!(
                        "map.path and state.dir changes take effect at the next restart"
                    );
                    new.settings.map_path = self.started.map_path.clone();
                    new.settings.state_dir = self.started.state_dir.clone();
                }
                if new.settings.store.url_file != self.started.store.url_file
                    || new.settings.store.schema != self.started.store.schema
                {
                    tracing::warn!("[store] changes take effect at the next restart");
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
