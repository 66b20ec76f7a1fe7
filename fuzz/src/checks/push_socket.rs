//! The push socket's request line (`IP<TAB>USER`), as the post-login hook sends it.

use dovegate::push::socket::{parse_request, request_line};

pub fn check(data: &[u8]) {
    // The server cuts the request at its first newline.
    let line = data.split(|&b| b == b'\n').next().unwrap_or(data);
    if let Some((ip, user)) = parse_request(line) {
        // The address is the text before the tab, whole: nothing in the user part chooses it.
        let text = std::str::from_utf8(line).unwrap();
        let before_tab = text.split('\t').next().unwrap();
        assert!(!before_tab.is_empty() && before_tab.len() <= 64);
        assert_eq!(dovegate::grant::parse_any_ip(before_tab), Some(ip));
        assert_eq!(ip, ip.to_canonical());
        assert!(user.len() <= line.len());
        // What the hook would send for it reads back the same.
        let again = request_line(&ip.to_string(), &user);
        let (ip2, _) = parse_request(&again[..again.len() - 1]).expect("own request line");
        assert_eq!(ip2, ip);
    }
}
