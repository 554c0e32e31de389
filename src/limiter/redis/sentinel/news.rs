//! What the sentinels' failover messages say about one service's master: a switch (from
//! the old master to the new), a promotion starting, a failover given up. Text in, facts out;
//! the follower in the parent module acts on them.

use fred::types::Message;

use super::{ABORTED, Addr, PROMOTING, SWITCH_MASTER};

/// What a sentinel's message says about `service`'s master.
#[derive(Debug, PartialEq)]
pub enum News {
    /// From the old master to the new one.
    Switch(Addr, Addr),
    Promoting,
    Aborted,
}

pub fn news_of(message: &Message, service: &str) -> Option<News> {
    parse_news(&message.channel, &message.value.as_string()?, service)
}

fn parse_news(channel: &str, text: &str, service: &str) -> Option<News> {
    let words: Vec<&str> = text.split_whitespace().collect();
    match channel {
        SWITCH_MASTER => parse_switch(text, service).map(|(from, to)| News::Switch(from, to)),
        // `slave <name> <ip> <port> @ <master name> <ip> <port>`
        PROMOTING => {
            let at = words.iter().position(|w| *w == "@")?;
            (words.first() == Some(&"slave") && words.get(at + 1) == Some(&service))
                .then_some(News::Promoting)
        }
        // `master <name> <ip> <port>`
        ABORTED => (words.first() == Some(&"master") && words.get(1) == Some(&service))
            .then_some(News::Aborted),
        _ => None,
    }
}

fn parse_switch(text: &str, service: &str) -> Option<(Addr, Addr)> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [name, old_host, old_port, new_host, new_port] = parts[..] else {
        return None;
    };
    if name != service {
        return None;
    }
    let addr = |host: &str, port: &str| {
        Some(Addr {
            host: host.to_string(),
            port: port.parse().ok()?,
        })
    };
    Some((addr(old_host, old_port)?, addr(new_host, new_port)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_and_abort_are_read_for_our_service_only() {
        let promoting = "slave 127.0.0.1:6381 127.0.0.1 6381 @ mymaster 127.0.0.1 6380";
        assert_eq!(
            parse_news(PROMOTING, promoting, "mymaster"),
            Some(News::Promoting)
        );
        assert_eq!(parse_news(PROMOTING, promoting, "other"), None);
        let aborted = "master mymaster 127.0.0.1 6380";
        assert_eq!(
            parse_news(ABORTED, aborted, "mymaster"),
            Some(News::Aborted)
        );
        assert_eq!(parse_news(ABORTED, aborted, "other"), None);
        assert_eq!(parse_news("+sdown", aborted, "mymaster"), None);
    }

    #[test]
    fn a_switch_is_read_for_our_service_only() {
        assert_eq!(
            parse_switch("mymaster 127.0.0.1 6380 10.0.0.2 6381", "mymaster"),
            Some((
                Addr {
                    host: "127.0.0.1".into(),
                    port: 6380
                },
                Addr {
                    host: "10.0.0.2".into(),
                    port: 6381
                }
            ))
        );
        assert_eq!(
            parse_switch("other 127.0.0.1 6380 10.0.0.2 6381", "mymaster"),
            None
        );
        for bad in [
            "",
            "mymaster",
            "mymaster 127.0.0.1 6380 10.0.0.2",
            "mymaster 127.0.0.1 x 10.0.0.2 6381",
            "mymaster 127.0.0.1 6380 10.0.0.2 6381 extra",
        ] {
            assert_eq!(parse_switch(bad, "mymaster"), None, "{bad:?}");
        }
    }
}
