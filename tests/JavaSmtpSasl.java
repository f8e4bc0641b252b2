/*
 * A JDK mail client in miniature, for tests/test_jdk_interop.py: SMTP over
 * implicit TLS written by hand (SSLSocket), with the AUTH exchange done by
 * the JDK's own SASL client (javax.security.sasl.Sasl.createSaslClient),
 * as JavaMail / Jakarta Mail do it.
 *
 * Arguments:
 *   port        the implicit-TLS port on localhost
 *   caPem       the PEM certificate to trust (the host name is checked)
 *   mechanisms  comma-separated SASL mechanisms in order of preference, or
 *               "EHLO" for the server's advertised list in its order
 *   user64      the user name, base64 of its UTF-8 (argv is not
 *               locale-proof)
 *   password64  the password, base64 of its UTF-8
 *   message     a file whose bytes (CRLF lines) are sent as DATA
 *   [p12 pass]  a PKCS#12 file with a client certificate, and its password
 *
 * Prints the dialogue ("C: ..." and "S: ..." lines, AUTH data decoded as
 * "C> " and "S> "), "ADVERTISED <list>" and "MECHANISM <chosen>"; exits 0
 * once the message is accepted, 2 when the server refuses, 3 when the JDK
 * has no mechanism for the list, 4 when the JDK's SASL client refuses
 * the server's data.
 */

import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.List;
import javax.net.ssl.KeyManager;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;
import javax.security.auth.callback.Callback;
import javax.security.auth.callback.NameCallback;
import javax.security.auth.callback.PasswordCallback;
import javax.security.auth.callback.UnsupportedCallbackException;
import javax.security.sasl.RealmCallback;
import javax.security.sasl.RealmChoiceCallback;
import javax.security.sasl.Sasl;
import javax.security.sasl.SaslClient;
import javax.security.sasl.SaslException;

public class JavaSmtpSasl {
    private static BufferedReader in;
    private static OutputStream out;

    private static String decode64(String value) {
        return new String(Base64.getDecoder().decode(value), StandardCharsets.UTF_8);
    }

    private static void send(String line) throws Exception {
        System.out.println("C: " + line);
        out.write((line + "\r\n").getBytes(StandardCharsets.UTF_8));
        out.flush();
    }

    /** One reply; returns its lines, the code in the first 3 characters. */
    private static List<String> reply() throws Exception {
        List<String> lines = new ArrayList<>();
        while (true) {
            String line = in.readLine();
            if (line == null) {
                throw new Exception("connection closed");
            }
            System.out.println("S: " + line);
            lines.add(line);
            if (line.length() < 4 || line.charAt(3) != '-') {
                return lines;
            }
        }
    }

    private static String last(List<String> lines) {
        return lines.get(lines.size() - 1);
    }

    private static void expect(List<String> lines, String code) throws Exception {
        if (!last(lines).startsWith(code)) {
            System.out.println("REFUSED " + last(lines));
            System.exit(2);
        }
    }

    public static void main(String[] args) throws Exception {
        // The transcript in UTF-8 whatever the locale.
        System.setOut(new PrintStream(new FileOutputStream(FileDescriptor.out), true, "UTF-8"));
        int port = Integer.parseInt(args[0]);
        String user = decode64(args[3]);
        char[] password = decode64(args[4]).toCharArray();
        byte[] message = Files.readAllBytes(Paths.get(args[5]));

        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (FileInputStream pem = new FileInputStream(args[1])) {
            trust.setCertificateEntry(
                "msa", CertificateFactory.getInstance("X.509").generateCertificate(pem));
        }
        TrustManagerFactory tmf =
            TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        KeyManager[] keyManagers = null;
        if (args.length > 7) {
            KeyStore keys = KeyStore.getInstance("PKCS12");
            try (FileInputStream p12 = new FileInputStream(args[6])) {
                keys.load(p12, args[7].toCharArray());
            }
            KeyManagerFactory kmf =
                KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
            kmf.init(keys, args[7].toCharArray());
            keyManagers = kmf.getKeyManagers();
        }
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(keyManagers, tmf.getTrustManagers(), null);
        SSLSocket socket = (SSLSocket) context.getSocketFactory().createSocket("localhost", port);
        SSLParameters parameters = socket.getSSLParameters();
        parameters.setEndpointIdentificationAlgorithm("HTTPS");
        socket.setSSLParameters(parameters);
        socket.setSoTimeout(20000);
        socket.startHandshake();
        in = new BufferedReader(new InputStreamReader(socket.getInputStream(), StandardCharsets.UTF_8));
        out = socket.getOutputStream();

        expect(reply(), "220");
        send("EHLO client.example");
        List<String> ehlo = reply();
        expect(ehlo, "250");
        String[] advertised = new String[0];
        for (String line : ehlo) {
            String keyword = line.substring(4);
            if (keyword.toUpperCase().startsWith("AUTH ")) {
                advertised = keyword.substring(5).trim().split(" +");
            }
        }
        System.out.println("ADVERTISED " + String.join(" ", advertised));
        String[] mechanisms = args[2].equals("EHLO") ? advertised : args[2].split(",");

        SaslClient sasl = Sasl.createSaslClient(
            mechanisms, null, "smtp", "localhost", new HashMap<String, Object>(),
            (Callback[] callbacks) -> {
                for (Callback callback : callbacks) {
                    if (callback instanceof NameCallback) {
                        ((NameCallback) callback).setName(user);
                    } else if (callback instanceof PasswordCallback) {
                        ((PasswordCallback) callback).setPassword(password);
                    } else if (callback instanceof RealmCallback) {
                        RealmCallback realm = (RealmCallback) callback;
                        realm.setText(realm.getDefaultText());
                    } else if (callback instanceof RealmChoiceCallback) {
                        ((RealmChoiceCallback) callback).setSelectedIndex(0);
                    } else {
                        throw new UnsupportedCallbackException(callback);
                    }
                }
            });
        if (sasl == null) {
            System.out.println("NO MECHANISM");
            System.exit(3);
        }
        System.out.println("MECHANISM " + sasl.getMechanismName());
        Base64.Encoder b64 = Base64.getEncoder();
        try {
            String command = "AUTH " + sasl.getMechanismName();
            if (sasl.hasInitialResponse()) {
                byte[] initial = sasl.evaluateChallenge(new byte[0]);
                System.out.println("C> " + new String(initial, StandardCharsets.UTF_8));
                command += " " + (initial.length == 0 ? "=" : b64.encodeToString(initial));
            }
            send(command);
            List<String> answer = reply();
            while (last(answer).startsWith("334")) {
                byte[] challenge = Base64.getDecoder().decode(last(answer).substring(4).trim());
                System.out.println("S> " + new String(challenge, StandardCharsets.UTF_8));
                byte[] response = sasl.evaluateChallenge(challenge);
                if (response == null) {
                    // The JDK's answer to DIGEST-MD5's rspauth: nothing more.
                    response = new byte[0];
                }
                System.out.println("C> " + new String(response, StandardCharsets.UTF_8));
                send(b64.encodeToString(response));
                answer = reply();
            }
            expect(answer, "235");
            if (!sasl.isComplete()) {
                System.out.println("SASL NOT COMPLETE");
                System.exit(4);
            }
        } catch (SaslException e) {
            System.out.println("SASL ERROR " + e);
            System.exit(4);
        }

        send("MAIL FROM:<ik@mijnbedrijf.nl>");
        expect(reply(), "250");
        send("RCPT TO:<belastingdienst@overheid.nl>");
        expect(reply(), "250");
        send("DATA");
        expect(reply(), "354");
        System.out.println("C: (message)");
        String text = new String(message, StandardCharsets.ISO_8859_1);
        StringBuilder data = new StringBuilder();
        for (String line : text.split("\r\n", -1)) {
            data.append(line.startsWith(".") ? "." + line : line).append("\r\n");
        }
        if (text.endsWith("\r\n")) {
            data.setLength(data.length() - 2);
        }
        data.append(".\r\n");
        out.write(data.toString().getBytes(StandardCharsets.ISO_8859_1));
        out.flush();
        expect(reply(), "250");
        send("QUIT");
        reply();
        socket.close();
    }
}
