//! Time windows of the appliance's bandwidth limit: `[copy.max_rate_windows]`
//! maps a window such as `"mon-fri 08:00-18:00"` to the rate in force during it,
//! in the appliance's local time; outside every window `copy.max_rate` is.
//! Where windows overlap, the lowest rate is in force (`0`, none, is the
//! highest). A window whose end is not after its start ends the next day
//! (`"fri 22:00-06:00"` runs from Friday night to Saturday morning); its days
//! are the days it starts on.

use chrono::{Datelike, NaiveDateTime, Timelike};

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const EXAMPLE: &str = "e.g. \"mon-fri 08:00-18:00\"";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateWindow {
    /// As the configuration writes it (for the log).
    pub text: String,
    /// Bytes/s during the window, 0 = none.
    pub rate: u64,
    /// The days the window starts on, Monday first.
    days: [bool; 7],
    /// Minutes after midnight.
    start: u32,
    end: u32,
}

impl RateWindow {
    /// `[DAYS ]HH:MM-HH:MM`, DAYS a comma-separated list of days (`mon`) and
    /// ranges of days (`mon-fri`, `fri-mon`); every day without it.
    pub fn parse(text: &str, rate: u64) -> Result<Self, String> {
        let bad = |why: &str| format!("'{text}': {why} ({EXAMPLE})");
        let (days, hours) = match text.trim().rsplit_once(' ') {
            Some((days, hours)) => (parse_days(days.trim()).map_err(|w| bad(&w))?, hours),
            None => ([true; 7], text.trim()),
        };
        let (from, to) = hours.split_once('-').ok_or_else(|| bad("no HH:MM-HH:MM"))?;
        let start =
            minutes(from, false).ok_or_else(|| bad(&format!("'{from}' is not a time of day (00:00 to 23:59)")))?;
        let end = minutes(to, true).ok_or_else(|| bad(&format!("'{to}' is not a time of day (00:00 to 24:00)")))?;
        if start == end {
            return Err(bad("the window is empty"));
        }
        Ok(Self { text: text.to_string(), rate, days, start, end })
    }

    pub fn contains(&self, now: NaiveDateTime) -> bool {
        let day = now.weekday().num_days_from_monday() as usize;
        let minute = now.hour() * 60 + now.minute();
        if self.start < self.end {
            self.days[day] && (self.start..self.end).contains(&minute)
        } else {
            (self.days[day] && minute >= self.start) || (self.days[(day + 6) % 7] && minute < self.end)
        }
    }
}

/// The rate in force at `now`, and the window that sets it (`None`: `base`).
pub fn rate_at(windows: &[RateWindow], base: u64, now: NaiveDateTime) -> (u64, Option<&RateWindow>) {
    let strictness = |rate: u64| if rate == 0 { u64::MAX } else { rate };
    windows
        .iter()
        .filter(|w| w.contains(now))
        .min_by_key(|w| strictness(w.rate))
        .map_or((base, None), |w| (w.rate, Some(w)))
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let day = |name: &str| {
        DAYS.iter()
            .position(|d| d.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| format!("'{name}' is not a day (mon, tue, wed, thu, fri, sat, sun)"))
    };
    let mut days = [false; 7];
    for item in text.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (day(a)?, day(b)?),
            None => (day(item)?, day(item)?),
        };
        let mut d = first;
        loop {
            days[d] = true;
            if d == last {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

/// `HH:MM` as minutes after midnight; `24:00` only as an end.
fn minutes(text: &str, end: bool) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    let digits = |s: &str| (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u32>().ok())?;
    let (h, m) = (digits(h)?, digits(m)?);
    match (h, m) {
        (24, 0) if end => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-30 is a Monday.
    fn at(day: u32, hh: u32, mm: u32) -> NaiveDateTime {
        let monday = chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        (monday + chrono::Days::new(u64::from(day) - 1)).and_hms_opt(hh, mm, 0).unwrap()
    }

    fn w(text: &str, rate: u64) -> RateWindow {
        RateWindow::parse(text, rate).unwrap()
    }

    #[test]
    fn business_hours_hold_on_weekdays_only() {
        let office = w("mon-fri 08:00-18:00", 100);
        assert!(office.contains(at(1, 8, 0)), "Monday 08:00, the start, is inside");
        assert!(office.contains(at(5, 17, 59)));
        assert!(!office.contains(at(5, 18, 0)), "the end is outside");
        assert!(!office.contains(at(1, 7, 59)));
        assert!(!office.contains(at(6, 12, 0)), "Saturday");
        assert!(!office.contains(at(7, 12, 0)), "Sunday");
    }

    #[test]
    fn a_window_that_ends_before_it_starts_runs_into_the_next_day() {
        let night = w("fri 22:00-06:00", 1);
        assert!(night.contains(at(5, 23, 0)), "Friday night");
        assert!(night.contains(at(6, 5, 59)), "Saturday morning");
        assert!(!night.contains(at(6, 6, 0)));
        assert!(!night.contains(at(5, 5, 0)), "Friday morning belongs to Thursday's night, not listed");
        let weekend = w("sat,sun 00:00-24:00", 1);
        assert!(weekend.contains(at(6, 0, 0)) && weekend.contains(at(7, 23, 59)));
        assert!(!weekend.contains(at(1, 0, 0)));
        let wrap = w("fri-mon 12:00-13:00", 1);
        assert!(wrap.contains(at(7, 12, 30)) && wrap.contains(at(1, 12, 30)) && !wrap.contains(at(2, 12, 30)));
        assert!(w("09:00-10:00", 1).contains(at(3, 9, 30)), "every day without days");
    }

    #[test]
    fn the_lowest_rate_of_the_windows_in_force_wins() {
        let ws = [w("mon-fri 08:00-18:00", 100), w("mon 12:00-13:00", 10), w("00:00-24:00", 0)];
        assert_eq!(rate_at(&ws, 500, at(1, 12, 30)).0, 10);
        assert_eq!(rate_at(&ws, 500, at(2, 12, 30)).0, 100);
        let (rate, window) = rate_at(&ws, 500, at(6, 12, 30));
        assert_eq!((rate, window.map(|w| w.text.as_str())), (0, Some("00:00-24:00")), "none beats the base");
        assert_eq!(rate_at(&ws[..1], 500, at(6, 12, 30)), (500, None), "outside every window: the base");
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for (text, why) in [
            ("mon-fri 08:00", "no HH:MM-HH:MM"),
            ("monday 08:00-18:00", "'monday' is not a day"),
            ("mon-fri 8:00-18:00", "'8:00' is not a time of day"),
            ("mon-fri 08:00-24:01", "'24:01' is not a time of day"),
            ("24:00-01:00", "'24:00' is not a time of day (00:00 to 23:59)"),
            ("mon 10:00-10:00", "the window is empty"),
            ("", "no HH:MM-HH:MM"),
        ] {
            let e = RateWindow::parse(text, 1).unwrap_err();
            assert!(e.contains(why) && e.contains(EXAMPLE), "{text}: {e}");
        }
    }
}
