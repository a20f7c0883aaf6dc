//! The parent tree of branches as the first column of a table:
//!
//! ```text
//! main
//! ├─ anon
//! │  └─ dev-alice
//! └─ feature-x
//! ```

/// Display order and the drawing before each name, for `nodes` given as (name, parent).
/// Tops are the nodes without a parent among `nodes` (the root, and children of deleted
/// branches), `first_top` first when it is one; siblings keep the order of `nodes`. Every
/// node appears exactly once, even if the parents formed a loop.
pub fn layout(nodes: &[(String, Option<String>)], first_top: &str) -> Vec<(usize, String)> {
    let index_of = |name: &str| nodes.iter().position(|(n, _)| n == name);
    let parent_of = |i: usize| nodes[i].1.as_deref().and_then(index_of).filter(|p| *p != i);
    let mut tops: Vec<usize> = (0..nodes.len())
        .filter(|i| parent_of(*i).is_none())
        .collect();
    tops.sort_by_key(|i| nodes[*i].0 != first_top);
    let mut placed = vec![false; nodes.len()];
    let mut out = Vec::with_capacity(nodes.len());
    for top in tops {
        place(top, "", None, nodes, &parent_of, &mut placed, &mut out);
    }
    // Only a loop of parents is left unplaced: show its members as tops, not lose them.
    for i in 0..nodes.len() {
        if !placed[i] {
            place(i, "", None, nodes, &parent_of, &mut placed, &mut out);
        }
    }
    out
}

/// `i` and below it its children; `last` is None for a top, else whether `i` is its
/// parent's last child. `indent` is what goes before the connector.
fn place(
    i: usize,
    indent: &str,
    last: Option<bool>,
    nodes: &[(String, Option<String>)],
    parent_of: &dyn Fn(usize) -> Option<usize>,
    placed: &mut [bool],
    out: &mut Vec<(usize, String)>,
) {
    if placed[i] {
        return;
    }
    placed[i] = true;
    let (drawn, below) = match last {
        None => (String::new(), String::new()),
        Some(false) => (format!("{indent}├─ "), format!("{indent}│  ")),
        Some(true) => (format!("{indent}└─ "), format!("{indent}   ")),
    };
    out.push((i, drawn));
    let children: Vec<usize> = (0..nodes.len())
        .filter(|c| parent_of(*c) == Some(i) && !placed[*c])
        .collect();
    for (n, child) in children.iter().enumerate() {
        place(
            *child,
            &below,
            Some(n + 1 == children.len()),
            nodes,
            parent_of,
            placed,
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drawn(nodes: &[(&str, Option<&str>)], first: &str) -> String {
        let owned: Vec<(String, Option<String>)> = nodes
            .iter()
            .map(|(n, p)| (n.to_string(), p.map(str::to_string)))
            .collect();
        layout(&owned, first)
            .into_iter()
            .map(|(i, prefix)| format!("{prefix}{}\n", owned[i].0))
            .collect()
    }

    #[test]
    fn a_three_level_family() {
        let nodes = [
            ("anon", Some("main")),
            ("dev-alice", Some("anon")),
            ("dev-bob", Some("anon")),
            ("feature-x", Some("main")),
            ("hotfix", Some("feature-x")),
            ("main", None),
        ];
        assert_eq!(
            drawn(&nodes, "main"),
            "main\n├─ anon\n│  ├─ dev-alice\n│  └─ dev-bob\n└─ feature-x\n   └─ hotfix\n"
        );
    }

    #[test]
    fn children_of_deleted_branches_are_tops_after_the_root() {
        let nodes = [
            ("a-orphan", Some("gone")),
            ("main", None),
            ("x", Some("main")),
        ];
        assert_eq!(drawn(&nodes, "main"), "main\n└─ x\na-orphan\n");
    }

    #[test]
    fn a_loop_of_parents_loses_nobody() {
        let nodes = [("a", Some("b")), ("b", Some("a")), ("main", None)];
        let out = drawn(&nodes, "main");
        assert_eq!(out, "main\na\n└─ b\n");
    }
}
