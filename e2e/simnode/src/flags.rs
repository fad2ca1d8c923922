//! A command-line parser with pflag's (cobra's) rules and messages, so the stand-ins accept and
//! refuse flags the way the real Go tools do: `--name=value`, `--name value`, bool flags with an
//! optional `=true|false`, shorthands (`-o json`, `-ojson`, `-yf`), and `--` ending the flags.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Value,
}

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub long: &'static str,
    pub short: Option<char>,
    pub kind: Kind,
}

pub const fn flag(long: &'static str, short: Option<char>, kind: Kind) -> Spec {
    Spec { long, short, kind }
}

#[derive(Debug, Default, Clone)]
pub struct Parsed {
    pub positionals: Vec<String>,
    /// Every flag occurrence in order, by long name; bools hold "true" or "false".
    occurrences: Vec<(&'static str, String)>,
}

impl Parsed {
    pub fn value(&self, long: &str) -> Option<&str> {
        self.occurrences
            .iter()
            .rev()
            .find(|(name, _)| *name == long)
            .map(|(_, v)| v.as_str())
    }

    pub fn changed(&self, long: &str) -> bool {
        self.occurrences.iter().any(|(name, _)| *name == long)
    }

    /// Names of the flags that were set, first occurrence order, without repeats.
    pub fn changed_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for (name, _) in &self.occurrences {
            if !names.contains(name) {
                names.push(name);
            }
        }
        names
    }

    pub fn bool(&self, long: &str, default: bool) -> bool {
        self.value(long).map(|v| v == "true").unwrap_or(default)
    }

    /// A string-slice flag: every occurrence, split on commas, like pflag's StringSlice.
    pub fn list(&self, long: &str) -> Vec<String> {
        self.occurrences
            .iter()
            .filter(|(name, _)| *name == long)
            .flat_map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
            })
            .collect()
    }
}

fn parse_bool(flag_text: &str, raw: &str) -> Result<String, String> {
    match raw {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok("true".into()),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok("false".into()),
        _ => Err(format!(
            "invalid argument {raw:?} for {flag_text:?} flag: strconv.ParseBool: parsing {raw:?}: invalid syntax"
        )),
    }
}

pub fn parse(args: &[String], specs: &[Spec]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            parsed.positionals.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let spec = specs
                .iter()
                .find(|s| s.long == name)
                .ok_or_else(|| format!("unknown flag: --{name}"))?;
            let value = match (spec.kind, inline) {
                (Kind::Bool, Some(v)) => parse_bool(&format!("--{name}"), v)?,
                (Kind::Bool, None) => "true".into(),
                (Kind::Value, Some(v)) => v.to_string(),
                (Kind::Value, None) => {
                    let v = args
                        .get(i)
                        .ok_or_else(|| format!("flag needs an argument: --{name}"))?;
                    i += 1;
                    v.clone()
                }
            };
            parsed.occurrences.push((spec.long, value));
        } else if arg.len() > 1 && arg.starts_with('-') {
            let shorts: Vec<char> = arg[1..].chars().collect();
            let mut j = 0;
            while j < shorts.len() {
                let c = shorts[j];
                j += 1;
                let spec = specs
                    .iter()
                    .find(|s| s.short == Some(c))
                    .ok_or_else(|| format!("unknown shorthand flag: '{c}' in {arg}"))?;
                let rest: String = shorts[j..].iter().collect();
                match spec.kind {
                    Kind::Bool => {
                        if let Some(v) = rest.strip_prefix('=') {
                            parsed
                                .occurrences
                                .push((spec.long, parse_bool(&format!("-{c}"), v)?));
                            break;
                        }
                        parsed.occurrences.push((spec.long, "true".into()));
                    }
                    Kind::Value => {
                        let value = if !rest.is_empty() {
                            rest.strip_prefix('=').unwrap_or(&rest).to_string()
                        } else {
                            let v = args
                                .get(i)
                                .ok_or_else(|| format!("flag needs an argument: '{c}' in -{c}"))?;
                            i += 1;
                            v.clone()
                        };
                        parsed.occurrences.push((spec.long, value));
                        break;
                    }
                }
            }
        } else {
            parsed.positionals.push(arg.clone());
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        flag("yes", Some('y'), Kind::Bool),
        flag("force", Some('f'), Kind::Bool),
        flag("output", Some('o'), Kind::Value),
        flag("config", None, Kind::Value),
        flag("ignore-preflight-errors", None, Kind::Value),
    ];

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn long_short_and_combined_forms() {
        let p = parse(
            &args(&["apply", "v1.32.0", "--yes", "--config=/a", "-ojson", "-yf"]),
            SPECS,
        )
        .unwrap();
        assert_eq!(p.positionals, ["apply", "v1.32.0"]);
        assert!(p.bool("yes", false) && p.bool("force", false));
        assert_eq!(p.value("config"), Some("/a"));
        assert_eq!(p.value("output"), Some("json"));
        let p = parse(
            &args(&["-o", "short", "--config", "/b", "--yes=false"]),
            SPECS,
        )
        .unwrap();
        assert_eq!(p.value("output"), Some("short"));
        assert_eq!(p.value("config"), Some("/b"));
        assert!(!p.bool("yes", true));
        assert_eq!(p.changed_names(), ["output", "config", "yes"]);
    }

    #[test]
    fn slices_split_on_commas_across_occurrences() {
        let p = parse(
            &args(&[
                "--ignore-preflight-errors=A,B",
                "--ignore-preflight-errors",
                "C",
            ]),
            SPECS,
        )
        .unwrap();
        assert_eq!(p.list("ignore-preflight-errors"), ["A", "B", "C"]);
    }

    #[test]
    fn refusals_use_pflag_messages() {
        assert_eq!(
            parse(&args(&["--nope"]), SPECS).unwrap_err(),
            "unknown flag: --nope"
        );
        assert_eq!(
            parse(&args(&["-z"]), SPECS).unwrap_err(),
            "unknown shorthand flag: 'z' in -z"
        );
        assert_eq!(
            parse(&args(&["--config"]), SPECS).unwrap_err(),
            "flag needs an argument: --config"
        );
        assert!(
            parse(&args(&["--yes=maybe"]), SPECS)
                .unwrap_err()
                .contains("strconv.ParseBool")
        );
    }

    #[test]
    fn double_dash_ends_flags() {
        let p = parse(&args(&["--yes", "--", "--force"]), SPECS).unwrap();
        assert_eq!(p.positionals, ["--force"]);
        assert!(!p.changed("force"));
    }
}
