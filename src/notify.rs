//! systemd service notifications (`Type=notify-reload`/`notify`): READY once the map exists
//! and the sources are open, RELOADING around a SIGHUP reload, STATUS with grants and lines
//! read, WATCHDOG pings from the engine loop (a stalled loop stops pinging). Every call is a
//! no-op when dovegate was not started by systemd (no NOTIFY_SOCKET).

use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// systemd 253+ wants the monotonic time with RELOADING=1.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| i128::from(ts.tv_sec()) * 1_000_000 + i128::from(ts.tv_nsec()) / 1000)
        .unwrap_or(0);
    let _ = sd_notify::notify(&[NotifyState::Reloading, NotifyState::MonotonicUsec(usec)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

pub fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of WatchdogSec, when the service sets it.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
