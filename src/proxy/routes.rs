//! Longest-prefix routing of request paths to upstream services.

/// Route prefixes sorted longest first, each with the index of the service it routes to.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<(String, usize)>,
}

impl RouteTable {
    /// Builds a table from `(prefix, service index)` pairs. Prefixes carry no trailing `/`
    /// (config validation normalises them), except the catch-all `/`.
    pub fn new(routes: impl IntoIterator<Item = (String, usize)>) -> Self {
        let mut routes: Vec<_> = routes.into_iter().collect();
        // Longest first, so the first match is the most specific; ties by text keep the
        // order deterministic.
        routes.sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Self { routes }
    }

    /// The service for `path`, as the tests read it.
    #[cfg(test)]
    pub fn lookup(&self, path: &str) -> Option<usize> {
        self.lookup_prefix(path).map(|(_, service)| service)
    }

    /// The prefix that matches `path` (a bounded label for metrics and spans, unlike the
    /// path) and its service. A prefix matches on whole segments: `/api/v1/users` matches
    /// `/api/v1/users` and `/api/v1/users/42` but not `/api/v1/usersettings`.
    pub fn lookup_prefix(&self, path: &str) -> Option<(&str, usize)> {
        self.routes
            .iter()
            .find(|(prefix, _)| matches_prefix(prefix, path))
            .map(|(prefix, service)| (prefix.as_str(), *service))
    }
}

fn matches_prefix(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table() -> RouteTable {
        RouteTable::new([
            ("/api/v1/users".to_owned(), 0),
            ("/api/v1/bookings".to_owned(), 1),
            ("/api/v1/users/admin".to_owned(), 2),
        ])
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let table = table();
        assert_eq!(table.lookup("/api/v1/users"), Some(0));
        assert_eq!(table.lookup("/api/v1/users/alice"), Some(0));
        assert_eq!(table.lookup("/api/v1/users/admin/x"), Some(2));
        assert_eq!(table.lookup("/api/v1/bookings/1"), Some(1));
        assert_eq!(table.lookup("/api/v1/usersettings"), None);
        assert_eq!(table.lookup("/"), None);
        assert_eq!(
            table.lookup_prefix("/api/v1/users/admin/x"),
            Some(("/api/v1/users/admin", 2))
        );
    }

    #[test]
    fn catch_all_matches_everything_last() {
        let table = RouteTable::new([("/".to_owned(), 9), ("/a".to_owned(), 1)]);
        assert_eq!(table.lookup("/a/b"), Some(1));
        assert_eq!(table.lookup("/b"), Some(9));
    }

    proptest! {
        #[test]
        fn a_match_is_always_a_segment_prefix(path in "(/[a-z]{0,6}){0,4}") {
            if let Some(service) = table().lookup(&path) {
                let prefix = ["/api/v1/users", "/api/v1/bookings", "/api/v1/users/admin"][service];
                let boundary = format!("{prefix}/");
                prop_assert!(path == prefix || path.starts_with(&boundary));
            }
        }
    }
}
