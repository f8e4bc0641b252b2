// The Jakarta Mail POP3 provider (Debian's libjakarta-mail-java) as a
// return-message client: log in over STLS or implicit TLS, verifying the
// server's certificate against a PEM file, write message 1 as received to
// a file, delete it and QUIT.  tests/test_pop3_clients.py compiles and runs
// it.
//
// java JakartaPop3Fetch PORT implicit|stls CERT.pem USER PASSWORD OUT [MECHANISMS]
import jakarta.mail.Flags;
import jakarta.mail.Folder;
import jakarta.mail.Message;
import jakarta.mail.Session;
import jakarta.mail.Store;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.OutputStream;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.util.Properties;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class JakartaPop3Fetch {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        boolean implicit = args[1].equals("implicit");
        KeyStore trusted = KeyStore.getInstance(KeyStore.getDefaultType());
        trusted.load(null, null);
        try (FileInputStream in = new FileInputStream(args[2])) {
            trusted.setCertificateEntry(
                "msa", CertificateFactory.getInstance("X.509").generateCertificate(in));
        }
        TrustManagerFactory tmf =
            TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trusted);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(null, tmf.getTrustManagers(), null);

        String protocol = implicit ? "pop3s" : "pop3";
        String p = "mail." + protocol + ".";
        Properties props = new Properties();
        props.put(p + "ssl.socketFactory", context.getSocketFactory());
        props.put(p + "ssl.checkserveridentity", "true");
        if (!implicit) {
            props.put(p + "starttls.enable", "true");
            props.put(p + "starttls.required", "true");
        }
        if (args.length > 6) {
            props.put(p + "auth.mechanisms", args[6]);
        }
        props.put(p + "connectiontimeout", "10000");
        props.put(p + "timeout", "10000");
        Session session = Session.getInstance(props);
        session.setDebug(true);
        Store store = session.getStore(protocol);
        store.connect("localhost", port, args[3], args[4]);
        Folder inbox = store.getFolder("INBOX");
        inbox.open(Folder.READ_WRITE);
        Message message = inbox.getMessage(1);
        try (OutputStream out = new FileOutputStream(args[5])) {
            message.writeTo(out);
        }
        message.setFlag(Flags.Flag.DELETED, true);
        inbox.close(true);
        store.close();
        System.out.println("FETCHED");
    }
}
