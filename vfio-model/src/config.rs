//! `VFIO_MODEL=group=N,device=NAME[,ports=1|2][,dma-logging=on|off][,log=PATH]`: the one
//! IOMMU group and device this process's model serves. `device` is the last component of the
//! sysfs path given to `--vfio` (an mdev UUID, say); `ports` is mtty's type (mtty-1 or -2);
//! `dma-logging=on` (mtty's no-op log ops) or `off` (a device without them: ENOTTY).

use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub group: u32,
    pub device: String,
    pub ports: usize,
    pub dma_logging: bool,
    pub log: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("VFIO_MODEL: '{0}' is not key=value")]
    NotKeyValue(String),
    #[error("VFIO_MODEL: bad value in '{0}'")]
    BadValue(String),
    #[error("VFIO_MODEL: unknown key in '{0}' (known: group, device, ports, dma-logging, log)")]
    UnknownKey(String),
    #[error("VFIO_MODEL: group= and device= are required")]
    Missing,
}

pub fn parse(s: &str) -> Result<Config, ConfigError> {
    let (mut group, mut device) = (None, None);
    let mut cfg = Config {
        group: 0,
        device: String::new(),
        ports: 2,
        dma_logging: true,
        log: None,
    };
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue(item.into()))?;
        let bad = || ConfigError::BadValue(item.into());
        match k {
            "group" => group = Some(v.parse::<u32>().map_err(|_| bad())?),
            "device" if !v.is_empty() && !v.contains('/') => device = Some(v.to_owned()),
            "ports" => {
                cfg.ports = match v {
                    "1" => 1,
                    "2" => 2,
                    _ => return Err(bad()),
                }
            }
            "dma-logging" => {
                cfg.dma_logging = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad()),
                }
            }
            "log" if !v.is_empty() => cfg.log = Some(v.to_owned()),
            "device" | "log" => return Err(bad()),
            _ => return Err(ConfigError::UnknownKey(item.into())),
        }
    }
    match (group, device) {
        (Some(g), Some(d)) => {
            cfg.group = g;
            cfg.device = d;
            Ok(cfg)
        }
        _ => Err(ConfigError::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c = parse("group=42,device=abc,ports=1,dma-logging=off,log=/tmp/l").unwrap();
        assert_eq!((c.group, c.device.as_str(), c.ports), (42, "abc", 1));
        assert!(!c.dma_logging);
        assert_eq!(c.log.as_deref(), Some("/tmp/l"));
        assert!(parse("group=1,device=d").unwrap().dma_logging);
        assert_eq!(parse("group=1"), Err(ConfigError::Missing));
        assert!(matches!(
            parse("group=x,device=d"),
            Err(ConfigError::BadValue(_))
        ));
        assert!(matches!(
            parse("group=1,device=d,nope=1"),
            Err(ConfigError::UnknownKey(_))
        ));
        assert!(matches!(
            parse("group=1,device=a/b"),
            Err(ConfigError::BadValue(_))
        ));
    }
}
