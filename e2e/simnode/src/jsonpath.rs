//! The subset of kubectl's JSONPath templates the tests and the upgrader need: field paths
//! (`.a.b`, `['a.b']`, `\.` escapes), `[n]`, `[*]`, `[?(@.path=="x")]` / `!=` filters,
//! `{range ...}{end}` and quoted literals. Anything else is refused with a clear error.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    All,
    Filter {
        path: Vec<Step>,
        equal: bool,
        literal: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Text(String),
    Path(Vec<Step>),
    Range(Vec<Step>, Vec<Item>),
}

pub fn render(template: &str, root: &Value) -> Result<String, String> {
    let items = parse(template)?;
    let mut out = String::new();
    emit(&items, root, &mut out);
    Ok(out)
}

fn unsupported(template: &str, why: &str) -> String {
    format!("error parsing jsonpath {template}: {why} (unsupported by the simulated kubectl)")
}

fn parse(template: &str) -> Result<Vec<Item>, String> {
    let mut stack: Vec<(Vec<Step>, Vec<Item>)> = Vec::new();
    let mut items = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let Some(open) = rest.find('{') else {
            items.push(Item::Text(rest.to_string()));
            break;
        };
        if open > 0 {
            items.push(Item::Text(rest[..open].to_string()));
        }
        let close = find_close(&rest[open..])
            .ok_or_else(|| unsupported(template, "unclosed action"))?
            + open;
        let action = rest[open + 1..close].trim();
        rest = &rest[close + 1..];
        if let Some(path) = action.strip_prefix("range ") {
            stack.push((
                parse_path(path.trim(), template)?,
                std::mem::take(&mut items),
            ));
        } else if action == "end" {
            let (path, outer) = stack
                .pop()
                .ok_or_else(|| unsupported(template, "{end} without {range}"))?;
            let body = std::mem::replace(&mut items, outer);
            items.push(Item::Range(path, body));
        } else if let Some(lit) = action.strip_prefix('"').and_then(|a| a.strip_suffix('"')) {
            items.push(Item::Text(lit.replace("\\n", "\n").replace("\\t", "\t")));
        } else {
            items.push(Item::Path(parse_path(action, template)?));
        }
    }
    if !stack.is_empty() {
        return Err(unsupported(template, "{range} without {end}"));
    }
    Ok(items)
}

/// The index of the `}` closing the `{` at 0, skipping quoted text.
fn find_close(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices().skip(1) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"') | (None, '\'') => quote = Some(c),
            (None, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_path(text: &str, template: &str) -> Result<Vec<Step>, String> {
    let text = text
        .strip_prefix('$')
        .or_else(|| text.strip_prefix('@'))
        .unwrap_or(text);
    let chars: Vec<char> = text.chars().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let mut name = String::new();
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    name.push(chars[i]);
                    i += 1;
                }
                if name.is_empty() {
                    if steps.is_empty() && i >= chars.len() {
                        break;
                    }
                    return Err(unsupported(
                        template,
                        "recursive descent '..' is not supported",
                    ));
                }
                steps.push(Step::Field(name));
            }
            '[' => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .ok_or_else(|| unsupported(template, "unclosed '['"))?
                    + i;
                let inner: String = chars[i + 1..end].iter().collect();
                steps.push(parse_bracket(inner.trim(), template)?);
                i = end + 1;
            }
            c => return Err(unsupported(template, &format!("unexpected {c:?}"))),
        }
    }
    Ok(steps)
}

fn parse_bracket(inner: &str, template: &str) -> Result<Step, String> {
    if inner == "*" {
        return Ok(Step::All);
    }
    if let Ok(n) = inner.parse::<i64>() {
        return Ok(Step::Index(n));
    }
    if let Some(name) = inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return Ok(Step::Field(name.to_string()));
    }
    if let Some(expr) = inner.strip_prefix("?(").and_then(|s| s.strip_suffix(')')) {
        let (lhs, rhs, equal) = if let Some((l, r)) = expr.split_once("==") {
            (l, r, true)
        } else if let Some((l, r)) = expr.split_once("!=") {
            (l, r, false)
        } else {
            return Err(unsupported(
                template,
                "only == and != filters are supported",
            ));
        };
        let literal = rhs
            .trim()
            .trim_matches(|c| c == '"' || c == '\'')
            .to_string();
        let lhs = lhs.trim();
        if !lhs.starts_with('@') {
            return Err(unsupported(template, "filters must start with @"));
        }
        return Ok(Step::Filter {
            path: parse_path(lhs, template)?,
            equal,
            literal,
        });
    }
    Err(unsupported(
        template,
        &format!("unsupported subscript [{inner}]"),
    ))
}

fn eval<'a>(steps: &[Step], from: &'a Value) -> Vec<&'a Value> {
    let mut current = vec![from];
    for step in steps {
        let mut next = Vec::new();
        for v in current {
            match step {
                Step::Field(name) => next.extend(v.get(name)),
                Step::Index(n) => {
                    if let Some(arr) = v.as_array() {
                        let idx = if *n < 0 { arr.len() as i64 + n } else { *n };
                        next.extend(usize::try_from(idx).ok().and_then(|i| arr.get(i)));
                    }
                }
                Step::All => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(o) => next.extend(o.values()),
                    _ => {}
                },
                Step::Filter {
                    path,
                    equal,
                    literal,
                } => {
                    if let Some(arr) = v.as_array() {
                        next.extend(arr.iter().filter(|el| {
                            let matched = eval(path, el)
                                .first()
                                .map(|x| scalar_text(x) == *literal)
                                .unwrap_or(false);
                            matched == *equal
                        }));
                    }
                }
            }
        }
        current = next;
    }
    current
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn emit(items: &[Item], ctx: &Value, out: &mut String) {
    for item in items {
        match item {
            Item::Text(t) => out.push_str(t),
            Item::Path(steps) => {
                let values: Vec<String> = eval(steps, ctx).into_iter().map(scalar_text).collect();
                out.push_str(&values.join(" "));
            }
            Item::Range(steps, body) => {
                let mut values = eval(steps, ctx);
                if values.len() == 1
                    && let Some(arr) = values[0].as_array()
                {
                    values = arr.iter().collect();
                }
                for v in values {
                    emit(body, v, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> Value {
        json!({"items": [
            {"metadata": {"name": "a", "labels": {"node-role.kubernetes.io/control-plane": ""}},
             "status": {"nodeInfo": {"kubeletVersion": "v1.31.4"},
                        "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "b", "labels": {}},
             "status": {"nodeInfo": {"kubeletVersion": "v1.30.6"}, "conditions": [{"type": "Ready", "status": "Unknown"}]}},
        ], "data": {"ClusterConfiguration": "kubernetesVersion: v1.31.4\n"}})
    }

    #[test]
    fn table_of_templates() {
        let cases = [
            (
                "{.data.ClusterConfiguration}",
                "kubernetesVersion: v1.31.4\n",
            ),
            ("{.items[*].metadata.name}", "a b"),
            ("{.items[0].status.nodeInfo.kubeletVersion}", "v1.31.4"),
            ("{.items[-1].metadata.name}", "b"),
            (
                "{range .items[*]}{.metadata.name} {.status.nodeInfo.kubeletVersion}{\"\\n\"}{end}",
                "a v1.31.4\nb v1.30.6\n",
            ),
            (
                "{.items[1].status.conditions[?(@.type==\"Ready\")].status}",
                "Unknown",
            ),
            (
                "{.items[0].metadata.labels.node-role\\.kubernetes\\.io/control-plane}",
                "",
            ),
            ("{.items[?(@.metadata.name!='a')].metadata.name}", "b"),
            ("{.missing.field}", ""),
            ("name={.items[0].metadata.name}", "name=a"),
        ];
        for (template, want) in cases {
            assert_eq!(render(template, &list()).unwrap(), want, "{template}");
        }
    }

    #[test]
    fn unsupported_templates_are_refused() {
        for bad in [
            "{..name}",
            "{.items[?(@.a>1)]}",
            "{range .items[*]}{.x}",
            "{.items[1:2]}",
            "{.a",
        ] {
            let err = render(bad, &list()).unwrap_err();
            assert!(
                err.contains("unsupported by the simulated kubectl"),
                "{bad}: {err}"
            );
        }
    }
}
